"""verl per-sample reward calls: batched by the adapter's queue vs scored one by one.

    python bench/verl_batching.py                          # tiny random model on the CPU (float32), 64 calls
    python bench/verl_batching.py --calls 256 --per-prompt 8 --wait-ms 10
    python bench/verl_batching.py --model-path path/to/rm --device cuda --dtype bfloat16

verl 0.9 calls a custom reward function once per sample, concurrently (themis_engine/integrations/
verl.py): an `async def` one is awaited on its event loop, a plain one runs in the loop's default
thread pool (min(32, CPUs + 4) threads). This script makes --calls such calls (--per-prompt responses
to each prompt, in shuffled order, as rollouts finish) and times, on the same scorer:

* one by one: each sample scored alone, one after the other (a per-sample function without a queue);
* threads: the sync compute_score from --calls threads at once;
* verl's pool: the sync compute_score from a thread pool of verl's default size (min(32, CPUs + 4));
* asyncio: compute_score_async, --calls coroutines gathered on one event loop.

Each mode: one warm-up run, then --repeats timed runs (bench/_harness.py: perf_counter on the CPU,
CUDA events on a GPU), the median. calls/s = --calls / median; "batches" is the queue's scoring calls
per run; "max |diff|" compares every reward with the one-by-one reward of the same sample.
Options go through themis_engine.config (`--key value`, a flag alone for true; --help lists them).
"""

import asyncio
import concurrent.futures
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402
import torch  # noqa: E402

import themis_engine as te  # noqa: E402
from themis_engine.config import ConfigError, option  # noqa: E402
from themis_engine.integrations.verl import make_compute_score  # noqa: E402

PROG = "python bench/verl_batching.py"
WORDS = ("def return for while if else int main print list sum value index buffer query user input sort fast "
         "slow memory leak secure inject sanitize readable name loop array map").split()


@dataclass
class VerlBatchingConfig:
    """verl per-sample reward calls: batched by the adapter's queue vs scored one by one."""

    calls: int = option(64, "concurrent per-sample calls (one verl step on one reward worker)")
    per_prompt: int = option(4, "responses per prompt (verl's rollout.n)")
    prompt_words: int = option(60, "words per prompt (about 1.3 tokens each)")
    response_words: int = option(40, "mean words per response (uniform in [half, 1.5x])")
    wait_ms: float = option(5.0, "the queue's batch_wait_ms")
    repeats: int = option(3, "timed runs per mode (median)")
    model_path: Optional[str] = option(None, "a reward model folder (default: a tiny random one, built here)")
    device: str = option("cpu", "device of the scorer")
    dtype: str = option("float32", "dtype of the scorer (torch name)")
    seed: int = option(0, "workload seed")
    json: Optional[str] = option(None, "also write the results to this JSON file")

    def check(self) -> None:
        for key in ("calls", "per_prompt", "prompt_words", "response_words", "repeats"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.wait_ms < 0:
            raise ConfigError(f"--wait-ms must be >= 0, got {self.wait_ms}")


def workload(opt: VerlBatchingConfig) -> list[tuple[str, str]]:
    """--calls (prompt, response) samples, --per-prompt per prompt, in shuffled order."""
    rng = random.Random(opt.seed)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    prompts = [text(opt.prompt_words) for _ in range(-(-opt.calls // opt.per_prompt))]
    items = [(prompts[i // opt.per_prompt],
              text(rng.randint(max(1, opt.response_words // 2), opt.response_words * 3 // 2)))
             for i in range(opt.calls)]
    rng.shuffle(items)
    return items


def load_scorer(opt: VerlBatchingConfig, tmp: str) -> tuple[te.Scorer, str]:
    if opt.model_path:
        path, name = opt.model_path, Path(opt.model_path).name
    else:
        from themis_engine.testing.tiny import build_checkpoint, build_tokenizer

        build_tokenizer(Path(tmp) / "tokenizer")
        path = build_checkpoint(Path(tmp) / "rm", tokenizer_dir=Path(tmp) / "tokenizer", family="qwen3",
                                criteria=list(te.DEFAULT_CRITERIA))
        name = "tiny random qwen3 (2 layers, hidden 64)"
    return te.Scorer.from_pretrained(path, device=opt.device, dtype=getattr(torch, opt.dtype)), name


def main(argv=None) -> dict:
    opt = harness.parse(VerlBatchingConfig, argv, prog=PROG, description=__doc__)
    device = torch.device(opt.device)
    env = harness.environment(device, "verl_batching.py", argv)
    items = workload(opt)
    with tempfile.TemporaryDirectory() as tmp:
        scorer, model_name = load_scorer(opt, tmp)
        fn = make_compute_score(scorer, batch_wait_ms=opt.wait_ms)
        queue = fn.queue
        infos = [{"prompt": p} for p, _ in items]
        pool_size = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor: what verl runs sync calls on

        def one_by_one():
            return [fn(solution_strs=[r], extra_infos=[info])[0] for (_, r), info in zip(items, infos)]

        def call(i):
            return fn(data_source="code", solution_str=items[i][1], ground_truth=None, extra_info=infos[i])

        wide = concurrent.futures.ThreadPoolExecutor(max_workers=opt.calls)
        narrow = concurrent.futures.ThreadPoolExecutor(max_workers=pool_size)
        loop = asyncio.new_event_loop()

        async def gathered():
            return await asyncio.gather(*(fn.as_async(data_source="code", solution_str=r, ground_truth=None,
                                                      extra_info=info) for (_, r), info in zip(items, infos)))

        modes = [
            ("one by one", one_by_one),
            (f"threads ({opt.calls})", lambda: list(wide.map(call, range(opt.calls)))),
            (f"verl's thread pool ({pool_size})", lambda: list(narrow.map(call, range(opt.calls)))),
            (f"asyncio ({opt.calls} coroutines)", lambda: loop.run_until_complete(gathered())),
        ]
        reference = one_by_one()
        rows = {"env": env, "model": model_name, "calls": opt.calls, "per_prompt": opt.per_prompt,
                "wait_ms": opt.wait_ms, "modes": []}
        try:
            for name, run in modes:
                diff = max(abs(a - b) for a, b in zip(run(), reference))
                before = queue.stats["batches"]
                timing = harness.benchmark(run, device, repeats=opt.repeats, warmup=1)
                batches = (queue.stats["batches"] - before) / (opt.repeats + 1)
                rows["modes"].append({"mode": name, "median_s": timing.median_s, "times_s": timing.times_s,
                                      "calls_per_s": opt.calls / timing.median_s, "batches_per_run": batches,
                                      "max_abs_diff": diff})
        finally:
            wide.shutdown()
            narrow.shutdown()
            loop.close()
    base = rows["modes"][0]["calls_per_s"]
    print(harness.header("verl per-sample reward calls", env, f"model: {model_name}",
                         f"{opt.calls} calls, {opt.per_prompt} per prompt, wait {opt.wait_ms:g} ms"))
    print(harness.markdown_table(
        ["mode", "calls/s", "median s", "scoring calls per run", "vs one by one", "max |diff|"],
        [[m["mode"], f"{m['calls_per_s']:.1f}", f"{m['median_s']:.4f}",
          "" if m["mode"] == "one by one" else f"{m['batches_per_run']:.1f}",
          f"{m['calls_per_s'] / base:.2f}x", f"{m['max_abs_diff']:.1e}"] for m in rows["modes"]]))
    harness.write_json(opt.json, rows)
    return rows


if __name__ == "__main__":
    main()
