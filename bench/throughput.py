"""End-to-end scoring throughput: themis_engine against Hugging Face transformers, same weights.

    python bench/throughput.py --model qwen3-8b            # on a GPU
    python bench/throughput.py --model qwen3-32b --skip-baseline --fp8 --max-tokens-per-batch auto
    python bench/throughput.py --cpu                       # smoke mode: tiny shape, CPU

Both sides score the same CodeRewardBench-shaped workload (themis_engine.data.workload, seeded) with the
same random weights: transformers' `AutoModelForSequenceClassification` (bf16, sdpa attention,
right-padded batches of --batch-size sequences in dataset order, as a standard evaluation script
does) and the engine (packed, prefix-shared micro-batches of --max-tokens-per-batch tokens).
Each is warmed up, then timed --repeats times; the table shows medians. MFU counts every unique
token once (shared prefixes once, no padding) against the card's dense bf16 peak (--peak-tflops).
The engine's scores are checked against the baseline's on the same pairs (max |diff| and
pairwise-preference agreement), so a fast wrong engine does not pass unnoticed.
--fp8: after the bf16 runs (and the baseline, which is then freed) the engine's block linears are
quantized in place to e4m3 with per-channel scales (themis_engine.model.fp8) and the engine is timed
again on the same pairs and budget: tokens/s, MFU (against the bf16 peak, so the MFU ratio is the
speed-up), and the FP8 scores' agreement with the bf16 engine's (preferences, correlation).
--max-tokens-per-batch auto: the budget the Scorer measures from free memory (themis_engine.scoring.budget).

Training throughput (--mode train), the same recipe on both sides:

    python bench/throughput.py --mode train --model qwen3-1.7b     # on a GPU
    python bench/throughput.py --mode train --model qwen3-8b --steps 2
    python bench/throughput.py --mode train --cpu                  # smoke + correctness, tiny, float32

* Data: --steps global batches of --global-batch CRB-like pairs (seeded); each pair's prefix is the
  prompt part, so chosen_response_start = len(prefix) and the LM term covers the chosen response.
* Objective: the themis-pm preset's BT + mu * magnitude (centering) + lambda * LM (mu 0.001,
  lambda 0.25), one head per criterion, a pair training its aspect's head, every term divided by
  its global-batch normaliser (batching.global_counts), gradient clipping at the preset's 1.5.
* Engine: RewardModel with its LM head + RewardObjective on batching.build_micro_batches (packed,
  prefix-shared micro-batches of --max-tokens-per-batch tokens), activation checkpointing per block
  (rm.gradient_checkpointing = True).
* Baseline: transformers' AutoModelForSequenceClassification (sdpa attention, gradient
  checkpointing, non-reentrant as the engine), chosen and rejected as separate right-padded
  sequences, --hf-micro-pairs pairs (2x sequences, padded to the longest) per micro-batch in
  dataset order, gradient accumulation over the global batch. The loss in plain PyTorch: the
  backbone's (final-normed) hidden states, `score` at each sequence's last real token (what the
  *ForSequenceClassification forward pools), -logsigmoid(r_c - r_r) + mu (r_c + r_r)^2 on the
  pair's head, and the cross-entropy of a separate bias-free `lm_head` Linear (tied to
  embed_tokens when the shape ties, else its own weight, the same tensor as the engine's) on the
  chosen response positions only (no full-vocabulary logits over the prompt or padding).
* Precision: on a GPU both sides train pure-bf16 parameters (no fp32 master copy; gradients in
  bf16), the optimizer's math in fp32 inside its fused kernel, states stored in bf16. --cpu: float32.
* Optimizer (--optimizer auto): fused AdamW with the themis-pm settings (lr 1e-5, betas
  (0.9, 0.95), eps 1e-8, weight decay 0.1 except norms and biases) when parameters + gradients +
  two AdamW states (8 bytes per parameter in bf16) fit in half the card's memory; otherwise plain
  SGD (no momentum: no state, 4 bytes per parameter; same lr and decay). So qwen3-1.7b trains with
  AdamW everywhere and qwen3-8b (65 GB for AdamW) trains with SGD on an 80 GB H100 and with AdamW
  on an H200. The same optimizer on both sides; the header says which. The optimizer step is a
  few tens of ms of a multi-second step either way.
* Weights: both sides start from the same random tensors (the engine's parameters ARE the
  baseline's tensors, so only one copy is in memory); training changes them in place.
* Order and checks: first one step of each side at lr 0 on the same warm-up batch (weights
  unchanged, so both see the initial weights): the per-step losses (total, BT, magnitude, LM) and
  gradient norms are compared (max relative difference printed; float32 on --cpu: ~1e-6). This
  step is also each side's warm-up (kernels compiled, allocator filled). Then transformers is timed,
  its optimizer freed, and the engine timed after one more warm-up step. Each timing covers
  --steps global batches (plan / pad the batch, forward + backward of every micro-batch, clip,
  optimizer step), repeated --repeats times over the same batches; the table shows the median.
  Peak memory is each side's own (the other side's gradients and optimizer state freed before).
* MFU (engine): 3x the forward FLOPs of the unique tokens (blocks' matmuls per unique token,
  attention on exactly the visible (query, key) pairs, the LM head on the LM target tokens); the
  recomputation of checkpointing is not counted. The transformers row is given the same useful
  FLOPs, so the MFU ratio is the time ratio.
* GPU time (estimated from the scoring run, not yet measured): qwen3-1.7b with the defaults (4 steps
  of 32 pairs, max_length 4096) and qwen3-8b with --steps 2 should each take one to two minutes on
  an H100/H200 (bench/gpu_check.sh steps tr17, tr8). Memory: the baseline's micro-batch defaults to
  2 pairs above 4B parameters, and its LM cross-entropy materialises [response tokens, vocab] logits
  in fp32 (about 10 bytes per element at the peak of the backward), as plain PyTorch does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import themis_engine as te
from themis_engine.train import microbatch as batching
from themis_engine.model.args import ModelArgs
from themis_engine.model.flops import DENSE_BF16_PEAK_TFLOPS, attention_flops, linear_flops_per_token
from themis_engine.train.objective import RewardObjective
from themis_engine.data.workload import crb_like_pairs



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("score", "train"), default="score",
                   help="score: scoring throughput (default); train: training step throughput")
    p.add_argument("--model", default="qwen3-0.6b", help="a built-in shape: " + ", ".join(te.model.args.NAMED_SHAPES))
    p.add_argument("--pairs", type=int, default=256, help="score: pairs in the workload")
    p.add_argument("--max-length", type=int, default=4096, help="longest standalone sequence")
    p.add_argument("--batch-size", type=int, default=8, help="baseline: sequences per padded batch")
    p.add_argument("--max-tokens-per-batch", type=_budget_arg, default=32768,
                   help="engine: token budget per micro-batch, or 'auto' (measured from free memory)")
    p.add_argument("--fp8", action="store_true", help="score: also time the engine with FP8 (e4m3) block weights")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: 3 score, 1 train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by card name)")
    p.add_argument("--skip-baseline", action="store_true", help="time the engine only")
    p.add_argument("--cpu", action="store_true", help="smoke mode: a tiny model on the CPU, float32")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    t = p.add_argument_group("--mode train")
    t.add_argument("--steps", type=int, default=4, help="timed optimizer steps (global batches)")
    t.add_argument("--global-batch", type=int, default=32, help="pairs per global batch (optimizer step)")
    t.add_argument("--warmup-pairs", type=int, default=8, help="pairs of the warm-up / loss-check batch")
    t.add_argument("--hf-micro-pairs", type=int, default=None,
                   help="baseline: pairs per padded micro-batch (2x sequences); default 4, 2 above 4B parameters")
    t.add_argument("--optimizer", choices=("auto", "adamw", "sgd"), default="auto",
                   help="auto: AdamW when params + grads + bf16 AdamW states fit in half the card, else SGD")
    t.add_argument("--tie", choices=("shape", "yes", "no"), default="shape",
                   help="tie the LM head to the embeddings (shape: as the model shape; the --cpu shape ties)")
    return p.parse_args(argv)


def _budget_arg(text: str):
    if text == "auto":
        return None  # the Scorer measures it on CUDA (themis_engine.scoring.budget), 16384 elsewhere
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a token budget must be positive, got {value}")
    return value


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
    engine.inv_freq = te.model.args.rope_inv_freq(args)[0].to(device)
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
    if opt.mode == "train":
        return main_train(opt)
    if opt.repeats is None:
        opt.repeats = 3
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
    from themis_engine.packing import planner as packing

    if budget is None:  # what the scorer chose
        budget = scorer.auto_budget.tokens if scorer.auto_budget is not None else 16384
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
    if opt.fp8:
        del hf
        hf = None
        rows["fp8"] = time_fp8(engine, scorer, work, warm, eng_scores, device, opt.repeats, flops, unique, peak, t_eng)
    print_table(rows)
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump(rows, f, indent=2)
    del engine, hf
    gc.collect()
    return rows


def time_fp8(engine, scorer, work, warm, bf16_scores, device, repeats, flops, unique, peak, t_bf16) -> dict:
    """Quantize the engine's block linears in place, then time it as the bf16 engine was timed."""
    from themis_engine.model.fp8 import fp8_backend, quantize_model

    gc.collect()
    report = quantize_model(engine)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    probe = torch.zeros(1, engine.args.hidden_size, device=device, dtype=engine.dtype)
    backend = fp8_backend(probe, engine.model.layers[0].self_attn.q_proj.weight_fp8)
    run_engine(scorer, warm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    scores = run_engine(scorer, work)
    t, times = time_it(lambda: run_engine(scorer, work), device, repeats)
    ref, got = bf16_scores.double(), scores.double()
    m_ref, m_got = ref[:, 0] - ref[:, 1], got[:, 0] - got[:, 1]
    return dict(
        backend=backend, s=t, times=times, pairs_per_s=len(work) / t, tokens_per_s=unique / t,
        mfu=flops / t / (peak * 1e12) if peak else float("nan"), speedup_vs_bf16=t_bf16 / t,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        bytes_saved_gib=report.bytes_saved / 2**30,
        preference_agreement=float(((m_ref > 0) == (m_got > 0)).double().mean()),
        score_correlation=float(np.corrcoef(ref.flatten().numpy(), got.flatten().numpy())[0, 1]),
        max_abs_diff=float((got - ref).abs().max()),
    )


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
    if "fp8" in r:
        f = r["fp8"]
        print(f"| themis_engine fp8 ({f['backend']}) | {f['pairs_per_s']:.2f} | {f['tokens_per_s']:.0f} | {f['s']:.3f} | "
              f"{f['peak_gib']:.2f} | {f['mfu']:.1%} |")
        print(f"fp8 / bf16 engine: {f['speedup_vs_bf16']:.2f}x | fp8 vs bf16 engine scores: preference agreement "
              f"{f['preference_agreement']:.1%}, correlation {f['score_correlation']:.4f}, max |diff| "
              f"{f['max_abs_diff']:.3g} | weights {f['bytes_saved_gib']:.1f} GiB smaller")
    print(f"token ratio (padded baseline tokens / engine tokens): {r['token_ratio']:.2f} on this run; "
          f"{r['token_ratio_full_workload']:.2f} on the full workload; "
          f"unique {r['unique_tokens']} / standalone {r['standalone_tokens']} / padded {r['padded_tokens']}")


# ================================================================================================
# --mode train: one training step of the same recipe, engine vs transformers
# ================================================================================================
class BenchPair:
    """The fields batching.build_micro_batches / global_counts read (data.TokenizedPair's names).
    (A plain class: the tests load this file with importlib, where @dataclass cannot resolve it.)"""

    __slots__ = ("chosen_ids", "rejected_ids", "chosen_response_start", "aspect_index", "margin")

    def __init__(self, chosen_ids, rejected_ids, chosen_response_start, aspect_index, margin=0.0):
        self.chosen_ids = chosen_ids  # the standalone chosen sequence (prefix + chosen response)
        self.rejected_ids = rejected_ids
        self.chosen_response_start = chosen_response_start  # = len(prefix): LM on the chosen response
        self.aspect_index = aspect_index  # the pair's head in the model's criteria
        self.margin = margin


def bench_pairs(work, criteria) -> list[BenchPair]:
    crit = list(criteria)
    return [BenchPair(p + c, p + r, len(p), crit.index(a) if a in crit else -1)
            for p, c, r, a in zip(work.prefix_ids, work.chosen_ids, work.rejected_ids, work.aspects)]


class HFRecipe(nn.Module):
    """The baseline: transformers' sequence classifier + an LM head Linear, and the same loss in plain
    PyTorch on right-padded batches where chosen and rejected are separate sequences."""

    def __init__(self, hf, lm_head: nn.Linear, micro_pairs: int, pad_id: int, lm_coef: float, mu: float):
        super().__init__()
        self.hf, self.lm_head = hf, lm_head
        self.micro_pairs, self.pad_id, self.lm_coef, self.mu = micro_pairs, pad_id, lm_coef, mu

    @property
    def device(self):
        return self.hf.score.weight.device

    def micro_batches(self, pairs, ids):
        """Padded micro-batches of `micro_pairs` pairs: (input_ids [2b, L], attention_mask, last-token
        index [2b], LM gather index into the flattened [2b*L] positions (chosen rows), LM labels)."""
        for i in range(0, len(ids), self.micro_pairs):
            chunk = [pairs[j] for j in ids[i : i + self.micro_pairs]]
            seqs = [s for p in chunk for s in (p.chosen_ids, p.rejected_ids)]
            L = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for j, s in enumerate(seqs):
                input_ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            last = torch.tensor([len(s) - 1 for s in seqs])
            lm_index, lm_labels = [], []
            for k, p in enumerate(chunk):  # standalone positions max(start-1, 0) .. L-2 predict the response
                c = p.chosen_ids
                t = torch.arange(max(p.chosen_response_start - 1, 0), len(c) - 1)
                lm_index.append(2 * k * L + t)  # sequence 2k is pair k's chosen
                lm_labels.append(torch.tensor(c, dtype=torch.long)[t + 1])
            yield chunk, input_ids, mask, last, torch.cat(lm_index), torch.cat(lm_labels), L

    def forward_backward(self, pairs, ids, bt_norm, lm_norm, H):
        """Forward + backward of every micro-batch of the global batch `ids`; yields the detached
        (loss, bt, magnitude, lm) of each, each term already divided by its global normaliser."""
        dev = self.device
        bt_n, lm_n = max(bt_norm, 1.0), max(lm_norm, 1.0)
        for chunk, input_ids, mask, last, lm_index, lm_labels, _ in self.micro_batches(pairs, ids):
            cell = torch.from_numpy(np.stack([batching.pair_mask(p.aspect_index, H) for p in chunk]))
            margin = torch.tensor([[float(p.margin or 0.0)] * H for p in chunk])
            input_ids, mask, last = (x.to(dev, non_blocking=True) for x in (input_ids, mask, last))
            lm_index, lm_labels = lm_index.to(dev, non_blocking=True), lm_labels.to(dev, non_blocking=True)
            cell, margin = cell.to(dev, non_blocking=True).float(), margin.to(dev, non_blocking=True)
            h = self.hf.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            r = self.hf.score(h[torch.arange(h.shape[0], device=dev), last]).float()  # [2b, H]
            rc, rr = r[0::2], r[1::2]
            bt = (-F.logsigmoid(rc - rr - margin) * cell).sum() / bt_n
            mag = ((rc + rr).pow(2) * cell).sum() / bt_n
            hc = h.reshape(-1, h.shape[-1])[lm_index]  # the chosen sequences' LM target positions
            lm = F.cross_entropy(self.lm_head(hc).float(), lm_labels, reduction="sum") / lm_n
            loss = bt + self.mu * mag + self.lm_coef * lm
            loss.backward()
            yield torch.stack([loss.detach(), bt.detach(), mag.detach(), lm.detach()]).double()


class EngineRecipe:
    """The engine: RewardObjective on the trainer's packed, prefix-shared micro-batches."""

    def __init__(self, objective, budget: int):
        self.objective, self.budget = objective, budget

    @property
    def device(self):
        return self.objective.rm.device

    def parameters(self):
        return self.objective.parameters()

    def named_parameters(self):
        return self.objective.named_parameters()

    def forward_backward(self, pairs, ids, bt_norm, lm_norm, H):
        dev = self.device
        for mb in batching.build_micro_batches(pairs, ids, self.budget, H, with_lm=True):
            loss, bt, lm = self.objective(**mb.to_torch(dev), bt_normalizer=bt_norm, lm_normalizer=lm_norm)
            loss.backward()
            lm = lm.detach() if lm is not None else torch.zeros((), device=dev)
            yield torch.stack([loss.detach(), bt.bt_loss.float(), bt.magnitude_loss.float(), lm.float()]).double()


def make_optimizer(side, kind: str, optim: dict, fused: bool):
    """The trainer's parameter groups (no weight decay on norms and biases) and optimizer."""
    decay, no_decay = [], []
    for name, p in side.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith("bias") or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if fused else {}
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"], **extra)
    return torch.optim.SGD(groups, lr=optim["lr"], momentum=0.0, **extra)


def train_step(side, opt, pairs, ids, H, lr, clip):
    """One optimizer step over the global batch `ids`, as Trainer.train_step (one process).
    Returns a float64 tensor [loss, bt, magnitude, lm, grad_norm] on the device (no host sync)."""
    bt_norm, lm_norm = batching.global_counts(pairs, ids, H, with_lm=True)
    for g in opt.param_groups:
        g["lr"] = lr
    sums = torch.zeros(4, dtype=torch.float64, device=side.device)
    for parts in side.forward_backward(pairs, ids, bt_norm, lm_norm, H):
        sums += parts
    params = [p for p in side.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.cat([sums, norm.detach().double().reshape(1).to(sums.device)])


def free(side, device):
    for p in side.parameters():
        p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_train_models(args: ModelArgs, device, dtype, micro_pairs: int, lm_coef: float, mu: float):
    """(engine objective, baseline HFRecipe) sharing every weight tensor, the LM head included."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(**args.to_hf_config("ForSequenceClassification"))
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        with torch.no_grad():
            hf.score.weight.normal_(0, args.hidden_size**-0.5)  # a non-zero reward head, as in score mode
        if args.tie_word_embeddings:
            lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device="meta")
            lm_head.weight = hf.model.embed_tokens.weight
        else:
            lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, dtype=dtype)
            with torch.no_grad():
                lm_head.weight.normal_(0, 0.02)
    enable = getattr(hf, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()
    baseline = HFRecipe(hf, lm_head, micro_pairs, args.pad_token_id, lm_coef, mu)

    with torch.device("meta"):
        rm = te.RewardModel(args, with_lm_head=True)
    sd = hf.state_dict()
    sd["lm_head.weight"] = lm_head.weight.detach()
    rm.load_state_dict({k: sd[k] for k in rm.state_dict()}, assign=True)
    if args.tie_word_embeddings:  # one Parameter, as the loader ties it (not two on one storage)
        rm.lm_head.weight = rm.model.embed_tokens.weight
    rm.inv_freq = te.model.args.rope_inv_freq(args)[0].to(device)
    rm.gradient_checkpointing = True
    objective = RewardObjective(rm, lm_coef=lm_coef, magnitude_coef=mu, magnitude="centering")
    objective.train()
    eng_ptrs = sorted(p.data_ptr() for p in objective.parameters())
    hf_ptrs = sorted(p.data_ptr() for p in baseline.parameters())
    if eng_ptrs != hf_ptrs:
        raise RuntimeError("engine and baseline do not share the same weight tensors")
    return objective, baseline


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def main_train(opt):
    from themis_engine.train.config import PRESETS

    if opt.max_tokens_per_batch is None:
        sys.exit("--max-tokens-per-batch auto is for --mode score (training's budget is a number)")
    if opt.fp8:
        sys.exit("--fp8 is for --mode score (FP8 weights are inference-only)")

    preset = PRESETS["themis-pm"]
    lm_coef = float(preset["objective"]["lm_coef"])
    mu = float(preset["objective"]["magnitude_coef"])
    optim = dict(preset["optim"])
    repeats = opt.repeats or 1
    if opt.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        args = ModelArgs(
            family="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, criteria=te.DEFAULT_CRITERIA,
            tie_word_embeddings=True,
        )
        # several micro-batches on both sides (global normalisers), an uneven last one in the check batch
        steps, G, W = min(opt.steps, 2), min(opt.global_batch, 4), min(opt.warmup_pairs, 3)
        max_length, budget, micro = min(opt.max_length, 384), 768, min(opt.hf_micro_pairs or 2, 2)
        card, total_mem = "cpu", None
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: run with --cpu for the smoke mode")
        device, dtype = torch.device("cuda"), torch.bfloat16
        args = ModelArgs.from_name(opt.model)
        steps, G, W = opt.steps, opt.global_batch, opt.warmup_pairs
        max_length, budget = opt.max_length, opt.max_tokens_per_batch
        micro = None
        card, total_mem = torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory
    if opt.tie != "shape":
        args = replace(args, tie_word_embeddings=opt.tie == "yes")
    args.pad_token_id = 0
    H = args.num_criteria
    n_params = _count_params(args)
    if micro is None:
        micro = opt.hf_micro_pairs or (4 if n_params < 4e9 else 2)
    kind = opt.optimizer
    auto = kind == "auto"
    if auto:
        kind = "adamw" if total_mem is None or 8 * n_params <= 0.5 * total_mem else "sgd"
    fused = device.type == "cuda"

    work = crb_like_pairs(steps * G, args.vocab_size, max_length=max_length, seed=opt.seed)
    warm = crb_like_pairs(W, args.vocab_size, max_length=max_length, seed=opt.seed + 1)
    pairs, warm_pairs = bench_pairs(work, args.criteria), bench_pairs(warm, args.criteria)
    batches = [list(range(s * G, (s + 1) * G)) for s in range(steps)]
    warm_ids = list(range(len(warm_pairs)))

    objective, baseline = build_train_models(args, device, dtype, micro, lm_coef, mu)
    engine = EngineRecipe(objective, budget)
    kernels_used = {op: te.kernels.backend_for(op, objective.rm.score.weight) for op in te.kernels.KERNEL_MODULES}
    clip, lr = float(optim["clip"]), float(optim["lr"])

    def timed(side, opt_):
        totals, outs = [], []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            outs = [train_step(side, opt_, pairs, ids, H, lr, clip) for ids in batches]
            sync(device)
            totals.append(time.perf_counter() - t0)
        return statistics.median(totals), totals, torch.stack(outs).cpu().tolist()

    def peak():
        return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    def reset_peak():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    # 1. the check step of each side at lr 0 (weights unchanged: both see the initial weights)
    o = make_optimizer(engine, kind, optim, fused)
    eng_check = train_step(engine, o, warm_pairs, warm_ids, H, 0.0, clip).cpu().tolist()
    del o
    free(engine, device)
    rows = {}
    if not opt.skip_baseline:
        reset_peak()
        o = make_optimizer(baseline, kind, optim, fused)
        hf_check = train_step(baseline, o, warm_pairs, warm_ids, H, 0.0, clip).cpu().tolist()
        # 2. transformers timed (its check step was its warm-up)
        t_hf, hf_times, hf_losses = timed(baseline, o)
        hf_mem = peak()
        del o
        free(baseline, device)
        diffs = {k: rel_diff(a, b) for k, a, b in zip(("loss", "bt", "magnitude", "lm", "grad_norm"),
                                                      eng_check, hf_check)}
        rows.update(hf_s=t_hf, hf_times=hf_times, hf_peak_gib=hf_mem, hf_step_losses=[x[0] for x in hf_losses],
                    hf_check=hf_check, check_rel_diff=diffs,
                    first_step_max_rel_diff=max(diffs[k] for k in ("loss", "bt", "magnitude", "lm")))
    # 3. the engine timed, after one more warm-up step (its optimizer state was freed)
    reset_peak()
    o = make_optimizer(engine, kind, optim, fused)
    train_step(engine, o, warm_pairs, warm_ids, H, lr, clip)
    t_eng, eng_times, eng_losses = timed(engine, o)
    eng_mem = peak()
    del o
    free(engine, device)

    # tokens and FLOPs of the timed steps (outside the timing)
    unique = attn = lm_tokens = 0.0
    standalone = padded = eng_mbs = hf_mbs = 0
    for ids in batches:
        mbs = batching.build_micro_batches(pairs, ids, budget, H, with_lm=True)
        eng_mbs += len(mbs)
        hf_mbs += len(range(0, len(ids), micro))
        unique += sum(mb.num_tokens for mb in mbs)
        attn += attention_flops(args, [mb.packed for mb in mbs])
        lm_tokens += batching.global_counts(pairs, ids, H, with_lm=True)[1]
        standalone += sum(len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids) for i in ids)
        padded += sum(mb[1].numel() for mb in baseline.micro_batches(pairs, ids))
    fwd = unique * linear_flops_per_token(args) + attn + 2.0 * args.hidden_size * args.vocab_size * lm_tokens
    train_flops = 3.0 * fwd
    peak_tf = opt.peak_tflops or next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in card), None)

    def mfu(t):
        return train_flops / t / (peak_tf * 1e12) if peak_tf else float("nan")

    # the token ratio of the full-size default workload needs no model: print it in every mode
    if opt.cpu:
        full = crb_like_pairs(opt.steps * opt.global_batch, 151936, max_length=opt.max_length, seed=opt.seed)
        ratio_full = full.padded_tokens(2 * (opt.hf_micro_pairs or 4)) / full.unique_tokens()
    else:
        ratio_full = padded / unique
    n_pairs = steps * G
    rows.update(
        mode="train", card=card, model="tiny" if opt.cpu else opt.model, steps=steps, global_batch=G,
        repeats=repeats, max_length=max_length, warmup_pairs=W, hf_micro_pairs=micro,
        max_tokens_per_batch=budget, optimizer=kind, optimizer_auto=auto, lr=lr,
        betas=list(optim["betas"]), eps=float(optim["eps"]), weight_decay=float(optim["weight_decay"]), lm_coef=lm_coef, magnitude_coef=mu, clip=clip,
        dtype=str(dtype).replace("torch.", ""), tied=args.tie_word_embeddings, params=n_params,
        kernels=kernels_used, engine_s=t_eng, engine_times=eng_times, engine_peak_gib=eng_mem,
        engine_pairs_per_s=n_pairs / t_eng, engine_tokens_per_s=unique / t_eng, engine_mfu=mfu(t_eng),
        engine_step_losses=[x[0] for x in eng_losses], engine_check=eng_check,
        unique_tokens=unique, standalone_tokens=standalone, padded_tokens=padded, lm_tokens=lm_tokens,
        train_flops=train_flops, engine_micro_batches=eng_mbs, hf_micro_batches=hf_mbs, token_ratio=padded / unique, token_ratio_full_workload=ratio_full,
    )
    if "hf_s" in rows:
        rows.update(hf_pairs_per_s=n_pairs / rows["hf_s"], hf_tokens_per_s=standalone / rows["hf_s"],
                    hf_mfu=mfu(rows["hf_s"]), speedup=rows["hf_s"] / t_eng)
    print_train_table(rows)
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump(rows, f, indent=2)
    del objective, baseline, engine
    gc.collect()
    return rows


def _count_params(args: ModelArgs) -> int:
    """Parameters of the reward model with its LM head (the tied head counted once)."""
    d, hd = args.hidden_size, args.head_dim
    attn = d * hd * (args.num_heads + 2 * args.num_kv_heads) + args.num_heads * hd * d + 2 * hd
    block = attn + 3 * d * args.intermediate_size + 2 * d
    emb = args.vocab_size * d * (1 if args.tie_word_embeddings else 2)
    return args.num_layers * block + emb + d + args.num_criteria * d


def print_train_table(r):
    gpu = r["dtype"] == "bfloat16"
    if r["optimizer"] == "adamw":
        opt_txt = (f"AdamW{' fused' if gpu else ''} (lr {r['lr']:g}, betas {tuple(r['betas'])}, eps {r['eps']:g}, "
                   f"wd {r['weight_decay']:g} but norms; {'bf16 states, ' if gpu else ''}fp32 math)")
    else:
        opt_txt = (f"SGD{' fused' if gpu else ''}, no momentum (lr {r['lr']:g}, wd {r['weight_decay']:g} but norms; no state"
                   f"{': AdamW would not fit in half the card' if r['optimizer_auto'] else ''})")
    print()
    print(f"training throughput | card: {r['card']} | model: {r['model']} ({r['params'] / 1e9:.2f}B params, "
          f"LM head {'tied' if r['tied'] else 'untied'}) | {r['steps']} steps x {r['global_batch']} CRB-like pairs, "
          f"max_length {r['max_length']} | repeats {r['repeats']} | baseline micro-batch {r['hf_micro_pairs']} pairs "
          f"({2 * r['hf_micro_pairs']} padded sequences) | engine budget {r['max_tokens_per_batch']} tokens")
    prec = ("both sides train pure-bf16 parameters (no fp32 master copy), optimizer math in fp32"
            if r["dtype"] == "bfloat16" else f"both sides {r['dtype']}")
    print(f"recipe (both sides): BT + {r['magnitude_coef']:g}*magnitude(centering) + {r['lm_coef']:g}*LM(chosen "
          f"response), a head per criterion, global normalisers, clip {r['clip']:g}, activation checkpointing | "
          f"optimizer: {opt_txt} | precision: {prec}")
    print(f"engine kernels: {r['kernels']}")
    print("| side | pairs/s | tokens/s | median s | peak GiB | MFU (unique tokens) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| themis_engine | {r['engine_pairs_per_s']:.2f} | {r['engine_tokens_per_s']:.0f} | {r['engine_s']:.3f} | "
          f"{r['engine_peak_gib']:.2f} | {r['engine_mfu']:.1%} |")
    if "hf_s" in r:
        print(f"| transformers | {r['hf_pairs_per_s']:.2f} | {r['hf_tokens_per_s']:.0f} | {r['hf_s']:.3f} | "
              f"{r['hf_peak_gib']:.2f} | {r['hf_mfu']:.1%} |")
        d = r["check_rel_diff"]
        print(f"speedup (pairs/s): {r['speedup']:.2f}x | first step (same weights, same batch, lr 0): loss engine "
              f"{r['engine_check'][0]:.6g} vs transformers {r['hf_check'][0]:.6g}, max rel diff (loss, BT, magnitude, "
              f"LM) {r['first_step_max_rel_diff']:.2e}, grad-norm rel diff {d['grad_norm']:.2e}")
    print(f"token ratio (padded baseline tokens / engine tokens): {r['token_ratio']:.2f} on this run; "
          f"{r['token_ratio_full_workload']:.2f} on the full workload; unique {r['unique_tokens']:.0f} / "
          f"standalone {r['standalone_tokens']} / padded {r['padded_tokens']}; micro-batches engine "
          f"{r['engine_micro_batches']} / transformers {r['hf_micro_batches']}")
    print("tokens/s: engine = unique tokens, transformers = real (unpadded) tokens; MFU = 3 x forward FLOPs of the "
          "unique tokens (blocks, attention on visible pairs, LM head on LM targets; recompute not counted), "
          "the same useful FLOPs for both rows")


if __name__ == "__main__":
    main()
