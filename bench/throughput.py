"""End-to-end scoring throughput: themis_engine against Hugging Face transformers, same weights.

    python bench/throughput.py --model qwen3-8b            # on a GPU
    python bench/throughput.py --cpu                       # smoke mode: tiny shape, CPU

Both sides score the same CodeRewardBench-shaped workload (themis_engine.workload, seeded) with the
same random weights: transformers' `AutoModelForSequenceClassification` (bf16, sdpa attention,
right-padded batches of --batch-size sequences in dataset order, as a standard evaluation script
does) and the engine (packed, prefix-shared micro-batches of --max-tokens-per-batch tokens).
Each is warmed up, then timed --repeats times; the table shows medians. MFU counts every unique
token once (shared prefixes once, no padding) against the card's dense bf16 peak (--peak-tflops).
The engine's scores are checked against the baseline's on the same pairs (max |diff| and
pairwise-preference agreement), so a fast wrong engine does not pass unnoticed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

import themis_engine as te
from themis_engine.config import ModelArgs
from themis_engine.flops import DENSE_BF16_PEAK_TFLOPS, attention_flops, linear_flops_per_token
from themis_engine.workload import crb_like_pairs



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="a built-in shape: " + ", ".join(te.config.NAMED_SHAPES))
    p.add_argument("--pairs", type=int, default=256, help="pairs in the workload")
    p.add_argument("--max-length", type=int, default=4096, help="longest standalone sequence")
    p.add_argument("--batch-size", type=int, default=8, help="baseline: sequences per padded batch")
    p.add_argument("--max-tokens-per-batch", type=int, default=32768, help="engine: token budget per micro-batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by card name)")
    p.add_argument("--skip-baseline", action="store_true", help="time the engine only")
    p.add_argument("--cpu", action="store_true", help="smoke mode: a tiny model on the CPU, float32")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def build_models(args: ModelArgs, device, dtype, with_baseline: bool):
    """The engine model and (optionally) the transformers model, sharing the same weight storage."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(**args.to_hf_config("ForSequenceClassification"))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    hf.eval()
    with torch.no_grad():
        hf.score.weight.normal_(0, args.hidden_size**-0.5)  # HF zero-inits nothing here, but be explicit
    with torch.device("meta"):
        engine = te.RewardModel(args)
    sd = hf.state_dict()
    engine.load_state_dict({k: v for k, v in sd.items() if k in dict(engine.named_parameters())}, assign=True)
    engine.inv_freq = te.config.rope_inv_freq(args)[0].to(device)
    engine.eval()
    if not with_baseline:
        del hf
        return engine, None
    return engine, hf


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run_engine(scorer, work):
    out = scorer.score_token_groups(work.prefix_ids, [[c, r] for c, r in zip(work.chosen_ids, work.rejected_ids)])
    return torch.stack(out)  # [N, 2, H]


def run_baseline(hf, work, batch_size, device, pad_id):
    seqs = work.sequences()
    rows = []
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            L = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            logits = hf(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            rows.append(logits.float().cpu())
    flat = torch.cat(rows)
    return flat.view(len(work), 2, -1)


def main(argv=None):
    opt = parse_args(argv)
    if opt.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        args = ModelArgs(
            family="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, criteria=te.DEFAULT_CRITERIA,
        )
        pairs, max_length, budget = min(opt.pairs, 16), min(opt.max_length, 512), 4096
        card = "cpu"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: run with --cpu for the smoke mode")
        device, dtype = torch.device("cuda"), torch.bfloat16
        args = ModelArgs.from_name(opt.model)
        pairs, max_length, budget = opt.pairs, opt.max_length, opt.max_tokens_per_batch
        card = torch.cuda.get_device_name()
    args.pad_token_id = 0
    work = crb_like_pairs(pairs, args.vocab_size, max_length=max_length, seed=opt.seed)
    # the token ratio of the full-size workload needs no model: print it in every mode
    full = crb_like_pairs(opt.pairs, 151936, max_length=opt.max_length, seed=opt.seed) if opt.cpu else work
    ratio_full = full.padded_tokens(opt.batch_size) / full.unique_tokens()

    engine, hf = build_models(args, device, dtype, with_baseline=not opt.skip_baseline)
    scorer = te.Scorer(engine, tokenizer=None, max_length=max_length, max_tokens_per_batch=budget)
    kernels_used = {op: te.kernels.backend_for(op, engine.score.weight) for op in te.kernels.KERNEL_MODULES}

    # warm-up on a slice (compiles kernels, fills the allocator), then the timed runs
    warm = crb_like_pairs(min(8, pairs), args.vocab_size, max_length=max_length, seed=opt.seed + 1)
    run_engine(scorer, warm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eng_scores = run_engine(scorer, work)
    t_eng, eng_times = time_it(lambda: run_engine(scorer, work), device, opt.repeats)
    eng_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    report = scorer.last_report
    from themis_engine import packing

    tokens, so, go = packing.flatten_groups([[p + c, p + r] for p, c, r in
                                             zip(work.prefix_ids, work.chosen_ids, work.rejected_ids)])
    batches = packing.plan(tokens, so, go, budget)
    unique = sum(b.num_tokens for b in batches)
    flops = unique * linear_flops_per_token(args) + attention_flops(args, batches)
    peak = opt.peak_tflops or next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in card), None)
    mfu = flops / t_eng / (peak * 1e12) if peak else float("nan")

    rows = {
        "card": card, "model": "tiny" if opt.cpu else opt.model, "pairs": pairs, "max_length": max_length,
        "engine_pairs_per_s": pairs / t_eng, "engine_tokens_per_s": unique / t_eng,
        "engine_s": t_eng, "engine_times": eng_times, "engine_peak_gib": eng_mem, "engine_mfu": mfu,
        "unique_tokens": unique, "standalone_tokens": work.standalone_tokens(),
        "padded_tokens": work.padded_tokens(opt.batch_size), "micro_batches": report.micro_batches,
        "token_ratio": work.padded_tokens(opt.batch_size) / unique, "token_ratio_full_workload": ratio_full,
        "kernels": kernels_used, "batch_size": opt.batch_size, "max_tokens_per_batch": budget,
    }
    if hf is not None:
        run_baseline(hf, warm, opt.batch_size, device, args.pad_token_id)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        hf_scores = run_baseline(hf, work, opt.batch_size, device, args.pad_token_id)
        t_hf, hf_times = time_it(lambda: run_baseline(hf, work, opt.batch_size, device, args.pad_token_id),
                                 device, opt.repeats)
        hf_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        diff = (eng_scores - hf_scores).abs()
        pref_eng = eng_scores[:, 0] > eng_scores[:, 1]
        pref_hf = hf_scores[:, 0] > hf_scores[:, 1]
        rows.update(
            hf_pairs_per_s=pairs / t_hf, hf_tokens_per_s=work.standalone_tokens() / t_hf, hf_s=t_hf,
            hf_times=hf_times, hf_peak_gib=hf_mem, speedup=t_hf / t_eng,
            max_abs_diff=float(diff.max()), score_scale=float(hf_scores.abs().mean()),
            preference_agreement=float((pref_eng == pref_hf).float().mean()),
        )
    print_table(rows)
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump(rows, f, indent=2)
    del engine, hf
    gc.collect()
    return rows


def print_table(r):
    print()
    print(f"scoring throughput | card: {r['card']} | model: {r['model']} | {r['pairs']} CRB-like pairs, "
          f"max_length {r['max_length']} | baseline batch {r['batch_size']} | engine budget {r['max_tokens_per_batch']}")
    print(f"engine kernels: {r['kernels']}")
    print("| side | pairs/s | tokens/s | median s | peak GiB | MFU (unique tokens) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| themis_engine | {r['engine_pairs_per_s']:.2f} | {r['engine_tokens_per_s']:.0f} | {r['engine_s']:.3f} | "
          f"{r['engine_peak_gib']:.2f} | {r['engine_mfu']:.1%} |")
    if "hf_s" in r:
        print(f"| transformers | {r['hf_pairs_per_s']:.2f} | {r['hf_tokens_per_s']:.0f} | {r['hf_s']:.3f} | "
              f"{r['hf_peak_gib']:.2f} | |")
        print(f"speedup (pairs/s): {r['speedup']:.2f}x | engine vs transformers scores: max |diff| "
              f"{r['max_abs_diff']:.3g} (mean |score| {r['score_scale']:.3g}), preference agreement "
              f"{r['preference_agreement']:.1%}")
    print(f"token ratio (padded baseline tokens / engine tokens): {r['token_ratio']:.2f} on this run; "
          f"{r['token_ratio_full_workload']:.2f} on the full workload; "
          f"unique {r['unique_tokens']} / standalone {r['standalone_tokens']} / padded {r['padded_tokens']}")


if __name__ == "__main__":
    main()
