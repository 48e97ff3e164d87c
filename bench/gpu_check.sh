#!/usr/bin/env bash
# The one prepared GPU check (see DEVELOPERS.md): install the tree, run the GPU tests, time scoring
# against transformers at 0.6B and 8B, time training steps against transformers at 1.7B and 8B,
# and print a short table last. Everything is logged under $OUT (the device tool brings that
# folder back). All steps can exceed one 10-minute call: pick a subset with STEPS when short.
#
#   bash bench/gpu_check.sh                 # all steps
#   STEPS="tests" bash bench/gpu_check.sh   # a subset: any of tests, kernels, tp06, tp8, tr17, tr8
#   STEPS="tr17 tr8" bash bench/gpu_check.sh  # the training comparison only (about 5 minutes at most)
set -uo pipefail
OUT=${OUT:-/tmp/themis_gpu_check}
mkdir -p "$OUT"
STEPS=${STEPS:-"tests kernels tp06 tp8 tr17 tr8"}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

{
  date -u; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }

status=()
step() {  # step NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  status+=("$name rc=$rc $((SECONDS - t0))s")
  tail -5 "$OUT/$name.log"
}

for s in $STEPS; do
  case $s in
    tests)   step tests 240 python3 -m pytest -q -x -p no:cacheprovider tests/ -m "gpu or not slow" \
               -k "kernel or gpu or attention" ;;
    kernels) [ -f bench/kernels.py ] && step kernels 150 python3 bench/kernels.py --json "$OUT/kernels.json" ;;
    tp06)    step tp06 150 python3 bench/throughput.py --model qwen3-0.6b --pairs 256 --json "$OUT/tp06.json"
             # if a kernel fails on the card, still measure the engine on the references
             grep -q "^| themis_engine" "$OUT/tp06.log" || THEMIS_KERNELS=reference step tp06ref 150 \
               python3 bench/throughput.py --model qwen3-0.6b --pairs 128 --json "$OUT/tp06ref.json" ;;
    tp8)     step tp8 240 python3 bench/throughput.py --model qwen3-8b --pairs 64 --repeats 2 --json "$OUT/tp8.json" ;;
    tr17)    step tr17 150 python3 bench/throughput.py --mode train --model qwen3-1.7b --steps 4 --global-batch 32 \
               --json "$OUT/tr17.json" ;;
    tr8)     step tr8 200 python3 bench/throughput.py --mode train --model qwen3-8b --steps 2 --global-batch 32 \
               --json "$OUT/tr8.json"
             # if it ran out of memory, still measure at a leaner setting (stateless SGD, smaller batches)
             grep -q "^| themis_engine" "$OUT/tr8.log" || step tr8lean 200 python3 bench/throughput.py --mode train \
               --model qwen3-8b --steps 1 --global-batch 32 --optimizer sgd --hf-micro-pairs 1 \
               --max-tokens-per-batch 16384 --json "$OUT/tr8lean.json" ;;
  esac
done

echo
echo "== gpu_check summary =="
printf '%s\n' "${status[@]}"
grep -hE "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -2
for f in tp06 tp06ref tp8 tr17 tr8 tr8lean; do
  [ -f "$OUT/$f.log" ] && grep -E "^\| |speedup|token ratio|kernels:|^training|^recipe|Error" "$OUT/$f.log"
done
[ -f "$OUT/kernels.log" ] && grep -E "^\|" "$OUT/kernels.log" | tail -20
exit 0
