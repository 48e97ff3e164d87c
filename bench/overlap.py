"""Text in, scores out: is the host (templating, tokenization, packing) hidden behind the device?

    python bench/overlap.py                         # real Qwen3 tokenizer, 256 CRB-like pairs, H200 speeds
    python bench/overlap.py --pairs 512 --device_ms_per_pair "[4.0, 37.0]"

No GPU is needed: the model is a stand-in whose forward takes a set device time per token
(computed tokens x (device ms per pair / computed tokens per pair)) on a device thread, returning at
once like an asynchronous CUDA launch; the scorer's one host copy at the end of a call waits for
the device queue to drain. The device times per pair are those of the H200 log in bench/RESULTS.md
(0.6B: 4 ms, 8B: 37 ms a pair, pre-tokenized). For each speed the same Scorer scores the same pairs:

* pre-tokenized: `score_token_groups` on ids made beforehand (the device-bound ceiling);
* text, pipelined: `score_pairs` on the conversations' text (the default Scorer: a producer thread
  encodes the next chunk while this one is launched);
* text, one thread: the same chunks with `scorer.pipeline = False` (encode a chunk, launch it, encode
  the next: the asynchronous device still runs while the host encodes);
* text, all first: one chunk (`scorer.chunk_sequences` above the call's size): every conversation
  encoded before the first launch, as the scorer did before the pipeline.

Each: one warm-up call, then --repeats timed calls (perf_counter; the stand-in's queue is drained
inside the timing), the median; pairs/s and the fraction of the pre-tokenized pairs/s. Options: --help.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

BENCH = str(Path(__file__).resolve().parent)
if BENCH not in sys.path:  # bench/: the shared harness
    sys.path.insert(0, BENCH)
import _harness as harness  # noqa: E402
from _text import crb_like_texts, tokenizer_dir  # noqa: E402

from themis_engine.config import option  # noqa: E402
from themis_engine.packing import planner as packing  # noqa: E402

PROG = "python bench/overlap.py"


@dataclass
class OverlapConfig:
    """The scorer's host side against a stand-in device of a set speed."""

    pairs: int = option(256, "CRB-like pairs per call (prompt ~300 tokens, answers ~400-800)")
    device_ms_per_pair: list[float] = option(factory=lambda: [4.0, 37.0],
                                             help="device time per pair, pre-tokenized (H200: 0.6B 4 ms, 8B 37 ms)")
    max_tokens_per_batch: int = option(32768, "the scorer's token budget")
    repeats: int = option(3, "timed calls per cell (the median)")
    tokenizer: Optional[str] = option(None, "tokenizer folder (default: the real Qwen3 one, else the tests' tiny one)")
    json: Optional[str] = option(None, "write the results here as JSON")


class StandInDevice(torch.nn.Module):
    """A reward model stand-in: forward(input_ids=[T], ...) queues `seconds_per_token * T` of device
    time on a device thread and returns zero rewards [num_scored, H] at once (an asynchronous launch)."""

    def __init__(self, criteria: list[str], seconds_per_token: float):
        super().__init__()
        self.criteria = list(criteria)
        self.seconds_per_token = seconds_per_token
        self.device_queue = ThreadPoolExecutor(1, thread_name_prefix="stand-in-device")
        self._last = None
        self._anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, input_ids, score_index, **kwargs):
        self._last = self.device_queue.submit(time.sleep, self.seconds_per_token * int(input_ids.numel()))
        return torch.zeros(int(score_index.numel()), len(self.criteria))

    def drain(self) -> None:
        """Wait for the device queue (what a CUDA sync does)."""
        self.device_queue.submit(lambda: None).result()


def parse_args(argv=None) -> OverlapConfig:
    return harness.parse(OverlapConfig, argv, prog=PROG, description=__doc__.split("\n\n")[0])


def main(argv=None) -> int:
    opt = parse_args(argv)
    import tempfile

    from transformers import AutoTokenizer

    import themis_engine as te

    tok_dir, tok_name = tokenizer_dir(opt.tokenizer, Path(tempfile.mkdtemp(prefix="overlap.")))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    prompts, chosen, rejected = crb_like_texts(opt.pairs)
    criteria = list(te.DEFAULT_CRITERIA)
    model = StandInDevice(criteria, 0.0)
    scorer = te.Scorer(model, tok, max_length=4096, max_tokens_per_batch=opt.max_tokens_per_batch)
    # the ids, made beforehand for the pre-tokenized calls
    enc = scorer.encode([[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
                         for p, c, r in zip(prompts, chosen, rejected) for a in (c, r)], spans=False)
    prefix, suffixes = [], []
    for k in range(opt.pairs):
        c, r = enc[2 * k].ids, enc[2 * k + 1].ids
        n = packing.shared_prefix_len([c, r])  # the packer's: each side keeps a token
        prefix.append(c[:n])
        suffixes.append([c[n:], r[n:]])
    scorer.score_token_groups(prefix, suffixes)
    computed = scorer.last_report.tokens_computed / opt.pairs  # tokens computed per pair (prefix once)

    def timed(fn) -> float:
        fn()
        model.drain()
        times = []
        for _ in range(opt.repeats):
            t0 = time.perf_counter()
            fn()
            model.drain()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def text():
        scorer.score_pairs(prompts, chosen, rejected)

    rows, results = [], []
    for ms in opt.device_ms_per_pair:
        model.seconds_per_token = ms / 1000 / computed
        pre = timed(lambda: scorer.score_token_groups(prefix, suffixes))
        piped = timed(text)
        scorer.pipeline = False
        serial = timed(text)
        scorer.pipeline, chunk = True, scorer.chunk_sequences
        scorer.chunk_sequences = 4 * opt.pairs
        whole = timed(text)
        scorer.chunk_sequences = chunk
        for name, t in (("pre-tokenized", pre), ("text, pipelined", piped), ("text, one thread", serial),
                        ("text, all first", whole)):
            rows.append([f"{ms:g}", name, f"{opt.pairs / t:.1f}", f"{t:.3f}", f"{pre / t:.0%}"])
        results.append(dict(device_ms_per_pair=ms, pretokenized_s=pre, pipelined_s=piped, one_thread_s=serial,
                            all_first_s=whole))
    device = torch.device("cpu")
    env = harness.environment(device, "overlap.py", argv)
    env["timing"] = f"perf_counter, median of {opt.repeats} (a CPU measurement: the host side is what is timed)"
    print(harness.header("Text-in scoring against a stand-in device", env, f"tokenizer: {tok_name}",
                         f"{opt.pairs} CRB-like pairs, {computed:.0f} computed tokens a pair, {_cores()} cores"))
    print(harness.markdown_table(["device ms / pair", "input", "pairs/s", "median s", "of pre-tokenized"], rows))
    harness.write_json(opt.json, dict(env=env, tokenizer=tok_name, computed_tokens_per_pair=computed,
                                      results=results))
    model.device_queue.shutdown()
    return 0


def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
