#!/usr/bin/env bash
# The one prepared GPU check (see DEVELOPERS.md): install the tree, run the GPU tests, the kernel
# benchmarks, scoring and training against transformers, large-model scoring; print a short table
# last. Every log and JSON is written to $LOGS and packed after each step into $OUT/gpu_check.tgz
# (the device tool brings back at most 8 files from $OUT; one archive keeps them all, even when the
# call is cut off), with the summary beside it in $OUT/summary.txt.
#
#   bash bench/gpu_check.sh                          # the default steps, stopping at DEADLINE
#   STEPS="tests kernels" bash bench/gpu_check.sh    # a subset, in the order given
#   DEADLINE=300 bash bench/gpu_check.sh             # seconds; a step that would not end by then is skipped
#
# Steps: estimate / limit in seconds (a step is skipped when less than its estimate is left before
# DEADLINE, and stopped at its limit or at DEADLINE), what each ran in before (H200, 2026-11-26):
#   tests    150/220  every GPU test, in 5 parallel pytest shards (Triton compiles on 16 cores at once),
#                     cut by folder, marker and op keyword, never by file name: tests/kernels whole (its
#                     interpreter-sized awkward shapes compile on the card too) in 4 disjoint -k shards
#                     (attention; RMSNorm / RoPE / SwiGLU; BT loss, linear CE, the convergence run; the
#                     rest, less the slow no-GPU sm_90 compile check), then `tests -m gpu` outside
#                     tests/kernels. 32 kernel tests took 159 s serially.
#   kernels  140/150  bench/kernel_ops.py (its own budget: 130 s): every kernel vs eager / SDPA / FlexAttention
#   tp06      70/120  scoring, qwen3-0.6b, engine vs transformers, pre-tokenized then from text (about
#                     40 s before the text-in runs were added; their time is an estimate)
#   tp8      100/160  scoring, qwen3-8b, engine vs transformers, pre-tokenized then from text (about 60 s
#                     before the text-in runs)
#   cuda      60/120  the CUDA scoring kernels (csrc/cuda): build with nvcc, each vs its Triton/PyTorch path
#   tr17      90/150  training steps, qwen3-1.7b, engine vs transformers (never ran yet)
#   tr8      120/200  training steps, qwen3-8b (never ran yet; a lean setting if it runs out of memory)
#   tp32     120/200  scoring qwen3-32b, engine only, bf16 then FP8 in place, budget from free memory
#   stream    60/120  layer streaming vs resident, 8 blocks of qwen3-32b's shape (bench/large_models.py)
#   sweep     60/120  attention tile candidates timed (bench/attention_sweep.py; not in the default list)
# Correctness first. All steps need about 13 minutes: more than one call (10 minutes at most) and,
# with the start-up, about a whole session's device time (15 minutes). Split them, e.g. call 1:
# STEPS="tests kernels tp06 tp8" (about 8 minutes); call 2: STEPS="cuda tr17 tr8 tp32 stream".
set -uo pipefail
OUT=${OUT:-/tmp/themis_gpu_check}
LOGS=${LOGS:-/tmp/themis_gpu_logs}
mkdir -p "$OUT" "$LOGS"
STEPS=${STEPS:-"tests kernels tp06 tp8 cuda tr17 tr8 tp32 stream"}
DEADLINE=${DEADLINE:-560}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
T0=$SECONDS

{
  date -u; git rev-parse --short HEAD 2>/dev/null || true; git status --short 2>/dev/null | head -5
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$LOGS/env.txt"

python3 -m pip install --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 || { tail -20 "$LOGS/install.log"; exit 1; }
python3 -c "import themis_engine._planner" 2>/dev/null || echo "note: the C++ planner was not built here (Python planner in use)"

status=()
pack() { tar czf "$OUT/gpu_check.tgz.part" -C "$LOGS" . 2>/dev/null && mv "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz"; }
remaining() { echo $((DEADLINE - (SECONDS - T0))); }
step() {  # step NAME ESTIMATE LIMIT CMD...: skipped when less than ESTIMATE seconds are left before
  # DEADLINE; stopped at LIMIT or at DEADLINE, whichever comes first
  local name=$1 est=$2 limit=$3; shift 3
  local left; left=$(remaining)
  if (( left < est )); then status+=("$name skipped (${left}s left before the deadline, needs ~${est}s)"); return; fi
  (( limit > left )) && limit=$left
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  status+=("$name rc=$rc $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (timed out)')")
  tail -4 "$LOGS/$name.log"
  pack
}

# tests/kernels is cut into shards by op keyword (pytest -k): each shard takes its group less the
# groups before it, and the last kernel shard takes what no group matched, so every test of the
# folder runs in exactly one shard whatever files it gains. The last shard leaves out the slow tests
# that need no GPU (the static sm_90 compile check, made for machines without a card).
KERNEL_GROUPS=("attention" "rms_norm or rope or swiglu" "bt_loss or linear_ce or convergence")
test_shard() {  # test_shard PYTEST-ARGS...: one pytest in the background, logged to tests<k>.log
  # shellcheck disable=SC2154  # k, limit, pids: run_tests' locals
  timeout -k 15 "$limit" python3 -m pytest -q -p no:cacheprovider -rfE --durations=3 "$@" \
    >"$LOGS/tests$k.log" 2>&1 &
  pids+=($!)
  echo "tests$k: pytest $*" >>"$LOGS/tests_shards.txt"
  k=$((k + 1))
}
run_tests() {
  local est=150 limit=220 t0=$SECONDS pids=() k=0 left seen="" group
  left=$(remaining)
  if (( left < est )); then status+=("tests skipped (${left}s left before the deadline)"); return; fi
  (( limit > left )) && limit=$left
  : >"$LOGS/tests_shards.txt"
  for group in "${KERNEL_GROUPS[@]}"; do
    test_shard tests/kernels -k "($group)${seen:+ and not ($seen)}"
    seen="${seen:+$seen or }$group"
  done
  test_shard tests/kernels -m "gpu or not slow" -k "not ($seen)"
  test_shard tests -m gpu --ignore=tests/kernels
  local rc=0 i
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || rc=$?; done
  status+=("tests rc=$rc $((SECONDS - t0))s")
  pack
  grep -E "^(FAILED|ERROR)|passed|failed| skipped in" "$LOGS"/tests?.log | head -30
}

for s in $STEPS; do
  case $s in
    tests)   run_tests ;;
    kernels) step kernels 140 150 python3 bench/kernel_ops.py --json "$LOGS/kernels.json" ;;
    tp06)    step tp06 70 120 python3 bench/throughput.py --model qwen3-0.6b --pairs 256 --json "$LOGS/tp06.json"
             # if a kernel fails on the card, still measure the engine on the references
             grep -q "^| themis_engine" "$LOGS/tp06.log" 2>/dev/null || THEMIS_KERNELS=reference step tp06ref 45 90 \
               python3 bench/throughput.py --model qwen3-0.6b --pairs 128 --text false --json "$LOGS/tp06ref.json" ;;
    tp8)     step tp8 100 160 python3 bench/throughput.py --model qwen3-8b --pairs 64 --repeats 2 --json "$LOGS/tp8.json" ;;
    cuda)    step cuda 60 120 python3 -m themis_engine.kernels.cuda_ext --bench ;;
    tr17)    step tr17 90 150 python3 bench/throughput.py --mode train --model qwen3-1.7b --steps 4 --global-batch 32 \
               --json "$LOGS/tr17.json" ;;
    tr8)     step tr8 120 200 python3 bench/throughput.py --mode train --model qwen3-8b --steps 2 --global-batch 32 \
               --json "$LOGS/tr8.json"
             # if it ran out of memory, still measure at a leaner setting (stateless SGD, smaller batches)
             grep -q "^| themis_engine" "$LOGS/tr8.log" 2>/dev/null || step tr8lean 120 200 python3 bench/throughput.py \
               --mode train --model qwen3-8b --steps 1 --global-batch 32 --optimizer sgd --hf-micro-pairs 1 \
               --max-tokens-per-batch 16384 --json "$LOGS/tr8lean.json" ;;
    tp32)    step tp32 120 200 python3 bench/throughput.py --model qwen3-32b --pairs 48 --repeats 2 --skip-baseline \
               --fp8 --max-tokens-per-batch auto --text false --json "$LOGS/tp32.json" ;;
    sweep)   step sweep 60 120 python3 bench/attention_sweep.py --json "$LOGS/sweep.json" ;;
    stream)  step stream 60 120 python3 bench/large_models.py --model qwen3-32b --streaming-only --pairs 32 \
               --json "$LOGS/stream.json" ;;
    *)       status+=("$s: unknown step") ;;
  esac
done

{
echo
echo "== gpu_check summary ($((SECONDS - T0))s) =="
printf '%s\n' "${status[@]}"
grep -E "^FAILED|^ERROR| passed| failed| skipped in" "$LOGS"/tests?.log 2>/dev/null | head -20
for f in tp06 tp06ref tp8 cuda tr17 tr8 tr8lean tp32 stream sweep; do
  [ -f "$LOGS/$f.log" ] && grep -E "^\| |speedup|token ratio|fp8 / bf16|streamed /|^scoring|^training|^recipe|^large-model|^layer streaming|Error" "$LOGS/$f.log"
done
[ -f "$LOGS/kernels.log" ] && grep -E "^\||target" "$LOGS/kernels.log" | tail -24
} 2>&1 | tee "$LOGS/summary.txt"
cp "$LOGS/summary.txt" "$OUT/summary.txt"
pack
exit 0
