#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it (not editable) into a fresh virtual
# environment, and from outside the source tree import every entry point, run the main job at a tiny
# size, one evaluation, and a server start with /health and one scored request.
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

python3 -m pip wheel -q --no-deps -w "$WORK/wheel" "$SRC"
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q torch==2.13.0
WHEEL="$(ls "$WORK"/wheel/themis_engine-*.whl)"
"$PY" -m pip install -q "${WHEEL}[eval,serve]"
cd "$WORK"

"$PY" - "$WORK" <<'PY'
import importlib, sys
from pathlib import Path
venv = Path(sys.argv[1]) / "venv"
for name in ("themis_engine", "themis_engine.train.__main__", "themis_engine.eval.__main__",
             "themis_engine.serve.__main__", "themis_engine.integrations.trl", "themis_engine.integrations.verl",
             "themis_engine.kernels", "themis_engine.kernels.reference", "themis_engine.kernels.cpu_attention",
             "themis_engine.data.__main__", "themis_engine.scoring.demo",
             "themis_engine._planner"):
    mod = importlib.import_module(name)
    where = Path(mod.__file__).resolve()
    assert venv.resolve() in where.parents, f"{name} was imported from {where}, not from the installed wheel"
print("wheel: every entry point imports from", venv)
PY

"$PY" -m themis_engine.train --preset demo --data.synthetic_pairs=160 --run.max_steps=3 \
    --run.output="$WORK/run" --run.progress=false
test -f "$WORK/run/export/config.json"
"$PY" -m themis_engine.data preview --preset demo --data.synthetic_pairs=160 --first 1 --json > "$WORK/preview.jsonl"
"$PY" -c "import json, sys; r = json.loads(open(sys.argv[1]).readline()); assert r['status'] == 'kept' and r['chosen']['ids'], r" \
    "$WORK/preview.jsonl"

"$PY" - "$WORK/crb.jsonl" <<'PY'
import sys
from themis_engine.data import pairs_to_rows, write_jsonl
from themis_engine.data.synthetic import make_demo_pairs
rows = pairs_to_rows(make_demo_pairs(24, seed=5), schema="crb")
for i, row in enumerate(rows):
    row["id"], row["subset"] = f"r{i}", row["subset"] or "smoke"
write_jsonl(rows, sys.argv[1])
PY
"$PY" -m themis_engine.eval "$WORK/run/export" --data "$WORK/crb.jsonl" --output "$WORK/eval" --head 0 --progress=false
test -f "$WORK/eval/results.json" && test -f "$WORK/eval/scores.parquet"

PORT=$(( 20000 + RANDOM % 20000 ))
"$PY" -m themis_engine.serve "$WORK/run/export" --port "$PORT" --query_format plain --log_level warning &
SERVER_PID=$!
"$PY" - "$PORT" <<'PY'
import json, sys, time, urllib.error, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.time() + 120
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            health = json.load(r)
        if health.get("status") == "ready":
            break
    except (urllib.error.URLError, ConnectionError):
        pass
    if time.time() > deadline:
        sys.exit("the server did not report ready within 120 s")
    time.sleep(0.5)
body = json.dumps({"query": ["Sum a list.def f(xs): return sum(xs)"], "prompts": ["Sum a list."]}).encode()
req = urllib.request.Request(base + "/get_reward", data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    out = json.load(r)
assert len(out["rewards"]) == 1 and isinstance(out["rewards"][0], float), out
print("server: /health ready, /get_reward ->", out["rewards"])
PY
echo "wheel smoke: OK"
