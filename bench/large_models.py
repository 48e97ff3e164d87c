"""Scoring a large reward model on one GPU: bf16 vs FP8 weights, and layer streaming vs resident.

    python bench/large_models.py                          # on a GPU: qwen3-32b, about 2-3 minutes
    python bench/large_models.py --model qwen3-14b --pairs 64
    python bench/large_models.py --cpu                    # smoke mode: tiny shape, CPU, float32

What it does, in one process, on the same card:

1. Builds a Qwen3-shaped RewardModel of --model (ModelArgs.from_name; 5 criteria heads) with random
   bf16 weights made directly on the GPU, one tensor at a time (nothing on the host; no download):
   normal(0, 0.02) linears and embeddings (HF's initializer_range), unit norms, a head of std
   hidden^-1/2.
2. Token budget: --max-tokens-per-batch, or chosen from free memory as the Scorer does by default
   (themis_engine.scoring.budget.auto_token_budget: one probe micro-batch measures the peak activation bytes
   per token; the budget is 85% of the memory left over that, rounded down to 1024, capped at 131072).
3. bf16: scores the CRB-like workload (themis_engine.data.workload, seeded; packed prefix-shared
   micro-batches through te.Scorer), warm-up on a slice, then --repeats timed runs (median).
4. FP8: quantize_model in place (e4m3 weights, per-channel scales; bf16 weights freed as it goes),
   the same budget, the same workload and timing. Agreement with the bf16 scores of step 3:
   pairwise-preference agreement (sign of chosen - rejected, every pair x criterion), Pearson
   correlation of the scores and of the margins, max |diff| / std.
5. Layer streaming: a model of the same shape with --stream-layers blocks (the ratio streamed /
   resident is per block, so a few blocks measure it; the full model would need its whole weight
   in pinned host memory), resident on the GPU, then stream_layers() (blocks in pinned host
   memory, double-buffered copies on a side stream) at a large budget (--stream-budget, default the
   auto budget of that model): tokens/s of both, their scores' max |diff|, and the host-to-device
   copy time of one block against the compute time of one block.

tokens/s and MFU count each unique token once (shared prefixes once, no padding); MFU of both bf16
and FP8 is against the card's dense bf16 peak (so the FP8/bf16 MFU ratio is the speedup).
Timing: bench/_harness.py (warm-up on a slice, then --repeats runs between CUDA events, the median);
the summary starts with the environment header (date, commit, card, versions, command line).
Options go through themis_engine.config (`--key value`, a flag alone for true; --help lists them).
"""

import gc
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

BENCH = str(Path(__file__).resolve().parent)
if BENCH not in sys.path:  # bench/: the shared harness
    sys.path.insert(0, BENCH)
import _harness as harness  # noqa: E402

import themis_engine as te  # noqa: E402
from themis_engine.config import ConfigError, option  # noqa: E402
from themis_engine.data.workload import crb_like_pairs  # noqa: E402
from themis_engine.model.args import NAMED_SHAPES, ModelArgs, rope_inv_freq  # noqa: E402
from themis_engine.model.flops import attention_flops, linear_flops_per_token  # noqa: E402
from themis_engine.model.fp8 import fp8_backend, quantize_model  # noqa: E402
from themis_engine.model.offload import stream_layers  # noqa: E402
from themis_engine.packing import planner as packing  # noqa: E402
from themis_engine.scoring.budget import auto_token_budget  # noqa: E402

PROG = "python bench/large_models.py"


@dataclass
class LargeModelsConfig:
    """Scoring a large reward model on one GPU: bf16 vs FP8 weights, layer streaming vs resident."""

    model: str = option("qwen3-32b", "a built-in shape: " + ", ".join(NAMED_SHAPES))
    pairs: int = option(48, "CRB-like pairs in the workload")
    max_length: int = option(4096, "longest standalone sequence (prompt + response) in tokens")
    max_tokens_per_batch: Optional[int] = option(None, "token budget (default: from free memory, as the Scorer)")
    repeats: int = option(2, "timed runs per configuration (median)")
    stream_layers: int = option(8, "blocks of the streaming comparison model")
    stream_budget: Optional[int] = option(None, "token budget of the streaming comparison (default: its auto budget)")
    fast_accum: bool = option(False, "FP8 GEMMs with _scaled_mm's fast accumulation")
    skip_fp8: bool = option(False, "skip step 4 (FP8 weights)")
    skip_streaming: bool = option(False, "skip step 5 (layer streaming)")
    streaming_only: bool = option(False, "only step 5 (no full-size model is built)")
    peak_tflops: Optional[float] = option(None, "dense bf16 peak for MFU (default: by card name)")
    seed: int = option(0, "weights and workload seed")
    cpu: bool = option(False, "smoke mode: a tiny model on the CPU, float32")
    json: Optional[str] = option(None, "also write the results to this JSON file")

    def check(self) -> None:
        """Raise ConfigError naming the first option that cannot work."""
        for key in ("pairs", "max_length", "repeats", "stream_layers", "max_tokens_per_batch", "stream_budget"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
        if not self.cpu and self.model.lower() not in NAMED_SHAPES:
            raise ConfigError(f"--model {self.model!r} is not a built-in shape ({', '.join(NAMED_SHAPES)})")


def parse_args(argv=None) -> LargeModelsConfig:
    return harness.parse(LargeModelsConfig, argv, prog=PROG, description=__doc__)


# ------------------------------------------------------------------------------------ model
@torch.no_grad()
def random_reward_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> te.RewardModel:
    """A RewardModel with random weights made on `device` tensor by tensor (meta skeleton first)."""
    with torch.device("meta"):
        rm = te.RewardModel(args)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(rm.named_parameters()):
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name == "score.weight":
            t.normal_(0.0, args.hidden_size**-0.5, generator=g)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=g)
        module_name, _, attr = name.rpartition(".")
        setattr(rm.get_submodule(module_name), attr, torch.nn.Parameter(t, requires_grad=False))
    rm.inv_freq = rope_inv_freq(args)[0].to(device)
    return rm.eval()


# ------------------------------------------------------------------------------------ timing
def score(scorer, work) -> torch.Tensor:
    out = scorer.score_token_groups(work.prefix_ids, [[c, r] for c, r in zip(work.chosen_ids, work.rejected_ids)])
    return torch.stack(out)  # [pairs, 2, H]


def plan(work, budget):
    tokens, so, go = packing.flatten_groups(
        [[p + c, p + r] for p, c, r in zip(work.prefix_ids, work.chosen_ids, work.rejected_ids)])
    return packing.plan(tokens, so, go, budget)


def measure(model, work, warm, budget, device, repeats, max_length, args, peak) -> tuple[dict, torch.Tensor]:
    """Warm-up on `warm`, then `repeats` timed runs over `work`; tokens/s, MFU, peak memory."""
    scorer = te.Scorer(model, tokenizer=None, max_length=max_length, max_tokens_per_batch=budget)
    score(scorer, warm)
    harness.reset_peak_memory(device)
    last = {}

    def run():
        last["scores"] = score(scorer, work)

    timing = harness.benchmark(run, device, repeats=repeats, warmup=0)
    t, times, scores = timing.median_s, timing.times_s, last["scores"]
    batches = plan(work, budget)
    unique = sum(b.num_tokens for b in batches)
    flops = unique * linear_flops_per_token(args) + attention_flops(args, batches)
    row = dict(
        seconds=t, times=times, tokens_per_s=unique / t, pairs_per_s=len(work) / t, unique_tokens=unique,
        micro_batches=len(batches), budget=budget, mfu=flops / t / (peak * 1e12) if peak else float("nan"),
        peak_gib=harness.peak_memory_gib(device),
    )
    return row, scores


def auto_budget(model) -> tuple[int, float]:
    """(token budget, activation bytes per token): the scorer's own choice (memory.auto_token_budget)."""
    b = auto_token_budget(model)
    return b.tokens, b.bytes_per_token


def agreement(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """ref, other: [pairs, 2, H] scores (chosen, rejected)."""
    ref, other = ref.double(), other.double()
    m_ref, m_other = ref[:, 0] - ref[:, 1], other[:, 0] - other[:, 1]
    return dict(
        preference_agreement=float(((m_ref > 0) == (m_other > 0)).double().mean()),
        score_correlation=float(np.corrcoef(ref.flatten().numpy(), other.flatten().numpy())[0, 1]),
        margin_correlation=float(np.corrcoef(m_ref.flatten().numpy(), m_other.flatten().numpy())[0, 1]),
        max_abs_diff_over_std=float((other - ref).abs().max() / ref.std()),
        mean_abs_diff_over_std=float((other - ref).abs().mean() / ref.std()),
    )


def block_copy_ms(srm, device) -> float:
    """Host-to-device time of one block's tensors on the streaming side stream (median of 5)."""
    if device.type != "cuda":
        return float("nan")
    buf, src = srm.block_buffers[0], srm.host_arenas[min(1, srm.num_layers - 1)]
    with torch.cuda.stream(srm.copy_stream):  # the harness's events on the copy stream
        timing = harness.benchmark(lambda: buf.arena.copy_(src, non_blocking=True), device, repeats=5, warmup=0,
                                   flush=False)
    buf.layer = None  # its content is no longer a known block
    return timing.median_ms


def full_model(opt, args, work, warm, device, dtype, max_length, peak, result, t0) -> int:
    """Steps 1-4 on the full-size model: bf16, then FP8 in place. Returns the token budget used."""
    rm = random_reward_model(args, device, dtype, opt.seed)
    result["build_s"] = time.perf_counter() - t0
    result["params_b"] = sum(p.numel() for p in rm.parameters()) / 1e9
    if opt.max_tokens_per_batch:
        budget, per_token = opt.max_tokens_per_batch, None
    elif opt.cpu:
        budget, per_token = 4096, None
    else:
        budget, per_token = auto_budget(rm)
    result["budget"], result["activation_bytes_per_token"] = budget, per_token
    weights_gib = sum(p.numel() * p.element_size() for p in rm.parameters()) / 2**30
    bf16, ref_scores = measure(rm, work, warm, budget, device, opt.repeats, max_length, args, peak)
    bf16["weights_gib"] = weights_gib
    result["bf16"] = bf16
    progress("bf16" if not opt.cpu else "fp32", bf16, t0)

    # 4: FP8 weights, in place
    if not opt.skip_fp8:
        report = quantize_model(rm, fast_accum=opt.fast_accum)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        probe = torch.zeros(1, args.hidden_size, device=device, dtype=dtype)
        backend = fp8_backend(probe, rm.model.layers[0].self_attn.q_proj.weight_fp8)
        fp8, fp8_scores = measure(rm, work, warm, budget, device, opt.repeats, max_length, args, peak)
        fp8.update(agreement(ref_scores, fp8_scores), backend=backend, fast_accum=opt.fast_accum,
                   weights_gib=sum(t.numel() * t.element_size() for t in list(rm.parameters()) + list(rm.buffers()))
                   / 2**30, bytes_saved_gib=report.bytes_saved / 2**30,
                   speedup_vs_bf16=bf16["seconds"] / fp8["seconds"])
        result["fp8"] = fp8
        progress(f"fp8 ({backend})", fp8, t0)
    del rm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return budget


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    opt = parse_args(argv)
    if opt.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        args = ModelArgs(family="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, criteria=te.DEFAULT_CRITERIA)
        pairs, max_length = min(opt.pairs, 8), min(opt.max_length, 256)
        card, peak = "cpu", None
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: run with --cpu for the smoke mode")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        args = ModelArgs.from_name(opt.model)
        pairs, max_length = opt.pairs, opt.max_length
        card = torch.cuda.get_device_name(device)
        peak = harness.peak_tflops(device, opt.peak_tflops)
    env = harness.environment(device, "large_models.py", argv)
    args.pad_token_id = 0
    work = crb_like_pairs(pairs, args.vocab_size, max_length=max_length, seed=opt.seed)
    warm = crb_like_pairs(min(4, pairs), args.vocab_size, max_length=max_length, seed=opt.seed + 1)
    result = dict(env=env, card=card, model="tiny" if opt.cpu else opt.model, pairs=pairs, max_length=max_length,
                  repeats=opt.repeats)

    # 1-4: the full-size model, bf16 (float32 on --cpu) then FP8
    t0 = time.perf_counter()
    budget = opt.max_tokens_per_batch or (4096 if opt.cpu else None)
    if not opt.streaming_only:
        budget = full_model(opt, args, work, warm, device, dtype, max_length, peak, result, t0)
    # 5: layer streaming vs resident, a model of the same shape with fewer blocks
    if not opt.skip_streaming:
        s_args = replace(args, num_layers=min(opt.stream_layers, args.num_layers))
        rm = random_reward_model(s_args, device, dtype, opt.seed + 1)
        if opt.stream_budget:
            s_budget = opt.stream_budget
        elif device.type == "cuda":
            s_budget = auto_budget(rm)[0]
        else:
            s_budget = budget
        resident, res_scores = measure(rm, work, warm, s_budget, device, opt.repeats, max_length, s_args, peak)
        srm = stream_layers(rm, device)
        copy_ms = block_copy_ms(srm, device)
        streamed, st_scores = measure(srm, work, warm, s_budget, device, opt.repeats, max_length, s_args, peak)
        block_bytes = srm.block_buffers[0].nbytes
        result["streaming"] = dict(
            layers=s_args.num_layers, budget=s_budget, resident=resident, streamed=streamed,
            streamed_over_resident=resident["seconds"] / streamed["seconds"],
            max_abs_diff=float((st_scores - res_scores).abs().max()),
            block_gib=block_bytes / 2**30, block_copy_ms=copy_ms,
            h2d_gb_per_s=block_bytes / copy_ms / 1e6 if copy_ms == copy_ms else float("nan"),
            block_compute_ms=resident["seconds"] * 1e3 / (s_args.num_layers * resident["micro_batches"]),
        )
        progress(f"resident ({s_args.num_layers} blocks)", resident, t0)
        progress(f"streamed ({s_args.num_layers} blocks)", streamed, t0)
        del srm, rm
    print_summary(result)
    harness.write_json(opt.json, result)
    return result


def progress(name, r, t0):
    print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {r['tokens_per_s']:.0f} tokens/s, "
          f"{r['micro_batches']} micro-batches of <= {r['budget']} tokens", flush=True)


SUMMARY_HEADERS = ["weights", "budget", "micro-batches", "tokens/s", "pairs/s", "median s", "peak GiB",
                   "MFU (bf16 peak)"]


def summary_row(name, r):
    return [name, r["budget"], r["micro_batches"], f"{r['tokens_per_s']:.0f}", f"{r['pairs_per_s']:.2f}",
            f"{r['seconds']:.2f}", f"{r['peak_gib']:.1f}", f"{r['mfu']:.1%}"]


def print_summary(r):
    print()
    if "bf16" in r:
        auto = (f" (auto: {r['activation_bytes_per_token'] / 1024:.0f} KiB of activations per token)"
                if r.get("activation_bytes_per_token") else "")
        print(harness.header("large-model scoring", r["env"], f"model: {r['model']} ({r['params_b']:.2f}B parameters)",
                             f"{r['pairs']} CRB-like pairs, max_length {r['max_length']}", f"repeats {r['repeats']}",
                             f"budget {r['budget']} tokens{auto}"))
        rows = [summary_row("bf16" if r["card"] != "cpu" else "fp32", r["bf16"])]
        if "fp8" in r:
            rows.append(summary_row(f"fp8 ({r['fp8']['backend']})", r["fp8"]))
        print(harness.markdown_table(SUMMARY_HEADERS, rows))
    if "fp8" in r:
        f = r["fp8"]
        print(f"FP8 / bf16 tokens/s: {f['speedup_vs_bf16']:.2f}x | weights {r['bf16']['weights_gib']:.1f} -> "
              f"{f['weights_gib']:.1f} GiB | agreement: preferences {f['preference_agreement']:.1%}, score r "
              f"{f['score_correlation']:.4f}, margin r {f['margin_correlation']:.4f}, max |diff| "
              f"{f['max_abs_diff_over_std']:.3f} std, mean |diff| {f['mean_abs_diff_over_std']:.3f} std")
    if "streaming" in r:
        s = r["streaming"]
        print(harness.header("layer streaming", r["env"], f"model: {r['model']}, {s['layers']} blocks of its shape",
                             f"{r['pairs']} CRB-like pairs", f"budget {s['budget']}"))
        print(harness.markdown_table(SUMMARY_HEADERS, [summary_row("resident", s["resident"]),
                                                       summary_row("streamed", s["streamed"])]))
        print(f"streamed / resident tokens/s: {s['streamed_over_resident']:.2f}x | scores max |diff| "
              f"{s['max_abs_diff']:.3g} | one block: {s['block_gib']:.2f} GiB, copy {s['block_copy_ms']:.1f} ms "
              f"({s['h2d_gb_per_s']:.1f} GB/s) vs compute {s['block_compute_ms']:.1f} ms per micro-batch")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
