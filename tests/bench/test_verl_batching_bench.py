"""bench/verl_batching.py's smoke run: every mode gives the one-by-one rewards, the queue batches."""

from __future__ import annotations

import json

from bench_scripts import load


def test_verl_batching_smoke(capsys, tmp_path):
    out_json = tmp_path / "verl.json"
    rows = load("verl_batching").main(["--calls", "6", "--per-prompt", "3", "--prompt-words", "8",
                                       "--response-words", "4", "--repeats", "1", "--wait-ms", "50",
                                       "--json", str(out_json)])
    out = capsys.readouterr().out
    assert out.lstrip().startswith("verl per-sample reward calls | card: cpu | torch ")  # the harness's header
    assert "command: python bench/verl_batching.py --calls 6" in out
    names = [m["mode"] for m in rows["modes"]]
    assert names[0] == "one by one" and any(n.startswith("asyncio") for n in names) and len(names) == 4
    for name in names:
        assert f"| {name} |" in out
    assert all(m["max_abs_diff"] < 1e-5 and m["calls_per_s"] > 0 for m in rows["modes"])
    asyncio_mode = next(m for m in rows["modes"] if m["mode"].startswith("asyncio"))
    assert 1 <= asyncio_mode["batches_per_run"] < 6  # the 6 coroutines shared scoring calls
    assert json.loads(out_json.read_text())["calls"] == 6
