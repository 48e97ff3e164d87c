"""End-to-end scoring throughput: themis_engine against Hugging Face transformers, same weights.

    python bench/throughput.py --model qwen3-8b            # on a GPU
    python bench/throughput.py --model qwen3-32b --skip-baseline --fp8 --max-tokens-per-batch auto
    python bench/throughput.py --cpu                       # smoke mode: tiny shape, CPU
    python bench/throughput.py --help                      # every option with its help

Options go through themis_engine.config (`--key value`, `--key=value`, a flag alone for true,
`--config FILE.yaml` with the same keys).

Both sides score the same CodeRewardBench-shaped workload (themis_engine.data.workload, seeded) with the
same random weights: transformers' `AutoModelForSequenceClassification` (bf16, sdpa attention,
right-padded batches of --batch-size sequences in dataset order, as a standard evaluation script
does) and the engine (packed, prefix-shared micro-batches of --max-tokens-per-batch tokens).
Each is warmed up, then timed --repeats times (bench/_harness.py: CUDA events, median); the table
shows medians, under the environment header (date, commit, card, versions, command line). MFU counts every unique
token once (shared prefixes once, no padding) against the card's dense bf16 peak (--peak-tflops).
The engine's scores are checked against the baseline's on the same pairs (max |diff| and
pairwise-preference agreement), so a fast wrong engine does not pass unnoticed.
--fp8: after the bf16 runs (and the baseline, which is then freed) the engine's block linears are
quantized in place to e4m3 with per-channel scales (themis_engine.model.fp8) and the engine is timed
again on the same pairs and budget: tokens/s, MFU (against the bf16 peak, so the MFU ratio is the
speed-up), and the FP8 scores' agreement with the bf16 engine's (preferences, correlation).
--max-tokens-per-batch auto: the budget the Scorer measures from free memory (themis_engine.scoring.budget).
Text-in (--text, on by default): then both sides are timed again from text, everything included:
--pairs CRB-like (prompt, chosen, rejected) strings (bench/_text.py: a prompt of 200-400 tokens,
answers of 400-800; --cpu: 10-30 and 20-60) with the --tokenizer's chat template (the real Qwen3
one by default; --cpu: the tiny test tokenizer); the engine through `Scorer.score_pairs`
(templating and tokenization pipelined with the device), transformers by applying the chat
template and tokenizing each padded batch before its forward. Both report pairs/s; the scores are compared as above.

Training throughput (--mode train), the same recipe on both sides:

    python bench/throughput.py --mode train --model qwen3-1.7b     # on a GPU
    python bench/throughput.py --mode train --model qwen3-8b --steps 2
    python bench/throughput.py --mode train --cpu                  # smoke + correctness, tiny, float32

* Data: --steps global batches of --global-batch CRB-like pairs (seeded); each pair's prefix is the
  prompt part, so chosen_response_start = len(prefix) and the LM term covers the chosen response.
* Objective: the themis-pm preset's (themis_engine.train.config.PRESETS) BT + mu * magnitude
  (centering) + lambda * LM (mu 0.001, lambda 0.25), one head per criterion (the preset's scalar
  head replaced by objective.heads=criteria), a pair training its aspect's head, every term divided by
  its global-batch normaliser (batching.global_counts), gradient clipping at the preset's 1.5.
* Engine: the trainer's own step, `themis_engine.train.trainer.Trainer.train_step` (plan the packed,
  prefix-shared micro-batches of --max-tokens-per-batch tokens -> `Trainer.forward_backward` each ->
  clip -> optimizer step), on a Trainer that holds the benchmark's model and pairs (`BenchTrainer`:
  no tokenizer, data files or checkpoints; the step and the objective are the trainer's, the
  optimizer is train.optim's); RewardModel with its LM head in RewardObjective, activation
  checkpointing per block by train.parallelize.
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
  optimizer step), repeated --repeats times over the same batches (bench/_harness.py: CUDA events,
  median); the table shows the median.
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
import gc
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BENCH = str(Path(__file__).resolve().parent)
if BENCH not in sys.path:  # bench/: the shared harness
    sys.path.insert(0, BENCH)
import _harness as harness  # noqa: E402
from _text import crb_like_texts, tokenizer_dir  # noqa: E402

import themis_engine as te  # noqa: E402
from themis_engine import config, distributed  # noqa: E402
from themis_engine.config import ConfigError, option  # noqa: E402
from themis_engine.data.workload import crb_like_pairs  # noqa: E402
from themis_engine.model.args import NAMED_SHAPES, ModelArgs  # noqa: E402
from themis_engine.model.flops import attention_flops, linear_flops_per_token  # noqa: E402
from themis_engine.packing import planner as packing  # noqa: E402
from themis_engine.train import microbatch as batching  # noqa: E402
from themis_engine.train import optim as train_optim  # noqa: E402
from themis_engine.train.config import PRESETS, TrainConfig  # noqa: E402
from themis_engine.train.objective import RewardObjective  # noqa: E402
from themis_engine.train.parallelize import parallelize  # noqa: E402
from themis_engine.train.trainer import Trainer  # noqa: E402

PROG = "python bench/throughput.py"


@dataclass
class ThroughputConfig:
    """End-to-end throughput of themis_engine against transformers on the same weights."""

    mode: Literal["score", "train"] = option("score", "score: scoring throughput; train: training step throughput")
    model: str = option("qwen3-0.6b", "a built-in shape: " + ", ".join(NAMED_SHAPES))
    pairs: int = option(256, "score: CRB-like pairs in the workload")
    max_length: int = option(4096, "longest standalone sequence (prompt + response) in tokens")
    batch_size: int = option(8, "score, baseline: sequences per right-padded batch")
    max_tokens_per_batch: Union[int, Literal["auto"]] = option(
        32768, "engine: token budget per micro-batch, or auto (score: measured from free memory by the Scorer)")
    fp8: bool = option(False, "score: also time the engine with FP8 (e4m3) block weights")
    text: bool = option(True, "score: also time both sides from text (conversations -> scores: templating and "
                        "tokenization included)")
    tokenizer: Optional[str] = option(
        None, "score, text: tokenizer folder (default: the real Qwen3 one where installed, else the tests' tiny one; "
        "--cpu: the tiny one)")
    repeats: Optional[int] = option(None, "timed repetitions (default: 3 score, 1 train)")
    seed: int = option(0, "workload seed")
    peak_tflops: Optional[float] = option(None, "dense bf16 peak for MFU (default: by card name)")
    skip_baseline: bool = option(False, "time the engine only")
    cpu: bool = option(False, "smoke mode: a tiny model on the CPU, float32")
    json: Optional[str] = option(None, "also write the results to this JSON file")
    steps: int = option(4, "train: timed optimizer steps (global batches)")
    global_batch: int = option(32, "train: pairs per global batch (optimizer step)")
    warmup_pairs: int = option(8, "train: pairs of the warm-up / loss-check batch")
    hf_micro_pairs: Optional[int] = option(
        None, "train, baseline: pairs per padded micro-batch (2x sequences); default 4, 2 above 4B parameters")
    optimizer: Literal["auto", "adamw", "sgd"] = option(
        "auto", "train: auto = AdamW when params + grads + bf16 AdamW states fit in half the card, else SGD")
    tie: Literal["shape", "yes", "no"] = option(
        "shape", "train: tie the LM head to the embeddings (shape: as the model shape; the --cpu shape ties)")

    def check(self) -> None:
        """Raise ConfigError naming the first option that cannot work."""
        if self.max_tokens_per_batch != "auto" and self.max_tokens_per_batch < 1:
            raise ConfigError(f"--max-tokens-per-batch: a token budget must be positive, got "
                              f"{self.max_tokens_per_batch}")
        for key in ("pairs", "max_length", "batch_size", "steps", "global_batch", "warmup_pairs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.repeats is not None and self.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {self.repeats}")
        if self.hf_micro_pairs is not None and self.hf_micro_pairs < 1:
            raise ConfigError(f"--hf-micro-pairs must be at least 1, got {self.hf_micro_pairs}")
        if not self.cpu and self.model.lower() not in NAMED_SHAPES:
            raise ConfigError(f"--model {self.model!r} is not a built-in shape ({', '.join(NAMED_SHAPES)})")
        if self.mode == "train":
            if self.max_tokens_per_batch == "auto":
                raise ConfigError("--max-tokens-per-batch auto is for --mode score (training's budget is a number)")
            if self.fp8:
                raise ConfigError("--fp8 is for --mode score (FP8 weights are inference-only)")


def parse_args(argv=None) -> ThroughputConfig:
    return harness.parse(ThroughputConfig, argv, prog=PROG, description=__doc__)


def tiny_args(**extra) -> ModelArgs:
    """The --cpu smoke shape."""
    return ModelArgs(family="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, criteria=te.DEFAULT_CRITERIA,
                     **extra)


def gpu_or_exit() -> torch.device:
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --cpu for the smoke mode")
    return torch.device("cuda")


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
        return main_train(opt, argv)
    repeats = opt.repeats or 3
    if opt.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        args = tiny_args()
        pairs, max_length, budget = min(opt.pairs, 16), min(opt.max_length, 512), 4096
    else:
        device, dtype = gpu_or_exit(), torch.bfloat16
        args = ModelArgs.from_name(opt.model)
        pairs, max_length = opt.pairs, opt.max_length
        budget = None if opt.max_tokens_per_batch == "auto" else opt.max_tokens_per_batch
    env = harness.environment(device, "throughput.py", argv)
    args.pad_token_id = 0
    work = crb_like_pairs(pairs, args.vocab_size, max_length=max_length, seed=opt.seed)
    # the token ratio of the full-size workload needs no model: print it in every mode
    full = crb_like_pairs(opt.pairs, 151936, max_length=opt.max_length, seed=opt.seed) if opt.cpu else work
    ratio_full = full.padded_tokens(opt.batch_size) / full.unique_tokens()

    engine, hf = build_models(args, device, dtype, with_baseline=not opt.skip_baseline)
    scorer = te.Scorer(engine, tokenizer=None, max_length=max_length, max_tokens_per_batch=budget)
    kernels_used = {op: te.kernels.backend_for(op, engine.score.weight) for op in te.kernels.KERNEL_MODULES}

    # warm-up on a slice (compiles kernels, fills the allocator; with budget None the Scorer measures
    # its budget here), one untimed run for the scores, then the timed runs
    warm = crb_like_pairs(min(8, pairs), args.vocab_size, max_length=max_length, seed=opt.seed + 1)
    run_engine(scorer, warm)
    harness.reset_peak_memory(device)
    eng_scores = run_engine(scorer, work)
    t_eng = harness.benchmark(lambda: run_engine(scorer, work), device, repeats=repeats, warmup=0)
    eng_mem = harness.peak_memory_gib(device)
    report = scorer.last_report

    if budget is None:  # what the scorer chose
        budget = scorer.auto_budget.tokens if scorer.auto_budget is not None else 16384
    tokens, so, go = packing.flatten_groups([[p + c, p + r] for p, c, r in
                                             zip(work.prefix_ids, work.chosen_ids, work.rejected_ids)])
    batches = packing.plan(tokens, so, go, budget)
    unique = sum(b.num_tokens for b in batches)
    flops = unique * linear_flops_per_token(args) + attention_flops(args, batches)
    peak = harness.peak_tflops(device, opt.peak_tflops)
    mfu = flops / t_eng.median_s / (peak * 1e12) if peak else float("nan")

    rows = {
        "env": env, "card": env["card"], "model": "tiny" if opt.cpu else opt.model, "pairs": pairs,
        "max_length": max_length, "repeats": repeats,
        "engine_pairs_per_s": pairs / t_eng.median_s, "engine_tokens_per_s": unique / t_eng.median_s,
        "engine_s": t_eng.median_s, "engine_times": t_eng.times_s, "engine_peak_gib": eng_mem, "engine_mfu": mfu,
        "unique_tokens": unique, "standalone_tokens": work.standalone_tokens(),
        "padded_tokens": work.padded_tokens(opt.batch_size), "micro_batches": report.micro_batches,
        "token_ratio": work.padded_tokens(opt.batch_size) / unique, "token_ratio_full_workload": ratio_full,
        "kernels": kernels_used, "batch_size": opt.batch_size, "max_tokens_per_batch": budget,
    }
    if hf is not None:
        run_baseline(hf, warm, opt.batch_size, device, args.pad_token_id)
        harness.reset_peak_memory(device)
        hf_scores = run_baseline(hf, work, opt.batch_size, device, args.pad_token_id)
        t_hf = harness.benchmark(lambda: run_baseline(hf, work, opt.batch_size, device, args.pad_token_id),
                                 device, repeats=repeats, warmup=0)
        hf_mem = harness.peak_memory_gib(device)
        diff = (eng_scores - hf_scores).abs()
        pref_eng = eng_scores[:, 0] > eng_scores[:, 1]
        pref_hf = hf_scores[:, 0] > hf_scores[:, 1]
        rows.update(
            hf_pairs_per_s=pairs / t_hf.median_s, hf_tokens_per_s=work.standalone_tokens() / t_hf.median_s,
            hf_s=t_hf.median_s, hf_times=t_hf.times_s, hf_peak_gib=hf_mem, speedup=t_hf.median_s / t_eng.median_s,
            max_abs_diff=float(diff.max()), score_scale=float(hf_scores.abs().mean()),
            preference_agreement=float((pref_eng == pref_hf).float().mean()),
        )
    if opt.text:
        rows["text"] = time_text(opt, engine, hf, device, pairs, max_length, budget, repeats)
    if opt.fp8:
        hf = None  # the baseline's memory back before the FP8 run
        rows["fp8"] = time_fp8(engine, scorer, work, warm, eng_scores, device, repeats, flops, unique, peak,
                               t_eng.median_s)
    print_table(rows)
    harness.write_json(opt.json, rows)
    engine = hf = scorer = None
    gc.collect()
    return rows


def time_text(opt: ThroughputConfig, engine, hf, device, pairs: int, max_length: int, budget, repeats: int) -> dict:
    """Both sides from text: CRB-like (prompt, chosen, rejected) strings (bench/_text.py) -> scores.

    Engine: `Scorer.score_pairs` (the chat template, the tokenizer, the packing and the forward,
    pipelined: what the evaluator and the adapters run). Baseline: the chat template applied to
    [user: prompt, assistant: answer] and the tokenizer called per right-padded batch of
    --batch-size sequences (chosen 0, rejected 0, chosen 1, ...), then the forward, as a
    transformers evaluation script does. Both end with the scores on the host."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="throughput.") as tmp:  # where a tiny tokenizer is built
        tok_dir, tok_name = tokenizer_dir("tiny" if opt.cpu and opt.tokenizer is None else opt.tokenizer, Path(tmp))
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if tok.pad_token is None:  # the baseline pads its batches
        tok.pad_token = tok.eos_token
    if len(tok) > engine.args.vocab_size:
        raise ConfigError(f"--tokenizer {tok_dir}: {len(tok)} ids, more than the model's vocabulary "
                          f"({engine.args.vocab_size})")
    lengths = dict(prompt_tokens=(10, 30), answer_tokens=(20, 60)) if opt.cpu else {}  # --cpu: max_length 512
    prompts, chosen, rejected = crb_like_texts(pairs, seed=opt.seed, **lengths)
    scorer = te.Scorer(engine, tok, max_length=max_length, max_tokens_per_batch=budget)

    def run_engine_text(n=pairs):
        c, r = scorer.score_pairs(prompts[:n], chosen[:n], rejected[:n])
        return torch.stack([c, r], 1)  # [n, 2, H]

    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
             for p, c, r in zip(prompts, chosen, rejected) for a in (c, r)]

    def run_baseline_text(n=pairs):
        rows = []
        with torch.inference_mode():
            for i in range(0, 2 * n, opt.batch_size):
                texts = tok.apply_chat_template(convs[i : min(i + opt.batch_size, 2 * n)], tokenize=False)
                enc = tok(texts, padding=True, truncation=True, max_length=max_length, add_special_tokens=False,
                          return_tensors="pt")
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                logits = hf(input_ids=ids, attention_mask=mask).logits
                rows.append(logits.float().cpu())
        return torch.cat(rows).view(n, 2, -1)

    warm = min(8, pairs)
    run_engine_text(warm)
    eng_scores = run_engine_text()
    report = scorer.last_report
    t_eng = harness.benchmark(run_engine_text, device, repeats=repeats, warmup=0)
    out = dict(tokenizer=tok_name, pairs=pairs, engine_s=t_eng.median_s, engine_times=t_eng.times_s,
               engine_pairs_per_s=pairs / t_eng.median_s, computed_tokens=report.tokens_computed,
               standalone_tokens=report.tokens_standalone, truncated=report.truncated)
    if hf is not None:
        pad = hf.config.pad_token_id
        hf.config.pad_token_id = tok.pad_token_id  # the pooled position: the last token that is not padding
        try:
            run_baseline_text(warm)
            hf_scores = run_baseline_text()
            t_hf = harness.benchmark(run_baseline_text, device, repeats=repeats, warmup=0)
        finally:
            hf.config.pad_token_id = pad
        pref_eng = eng_scores[:, 0] > eng_scores[:, 1]
        pref_hf = hf_scores[:, 0] > hf_scores[:, 1]
        out.update(hf_s=t_hf.median_s, hf_times=t_hf.times_s, hf_pairs_per_s=pairs / t_hf.median_s,
                   speedup=t_hf.median_s / t_eng.median_s, max_abs_diff=float((eng_scores - hf_scores).abs().max()),
                   preference_agreement=float((pref_eng == pref_hf).float().mean()))
    return out


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
    harness.reset_peak_memory(device)
    scores = run_engine(scorer, work)
    timing = harness.benchmark(lambda: run_engine(scorer, work), device, repeats=repeats, warmup=0)
    t = timing.median_s
    ref, got = bf16_scores.double(), scores.double()
    m_ref, m_got = ref[:, 0] - ref[:, 1], got[:, 0] - got[:, 1]
    return dict(
        backend=backend, s=t, times=timing.times_s, pairs_per_s=len(work) / t, tokens_per_s=unique / t,
        mfu=flops / t / (peak * 1e12) if peak else float("nan"), speedup_vs_bf16=t_bf16 / t,
        peak_gib=harness.peak_memory_gib(device), bytes_saved_gib=report.bytes_saved / 2**30,
        preference_agreement=float(((m_ref > 0) == (m_got > 0)).double().mean()),
        score_correlation=float(np.corrcoef(ref.flatten().numpy(), got.flatten().numpy())[0, 1]),
        max_abs_diff=float((got - ref).abs().max()),
    )


TABLE_HEADERS = ["side", "pairs/s", "tokens/s", "median s", "peak GiB", "MFU (unique tokens)"]


def _side_row(name, pairs_per_s, tokens_per_s, seconds, peak_gib, mfu):
    return [name, f"{pairs_per_s:.2f}", f"{tokens_per_s:.0f}", f"{seconds:.3f}", f"{peak_gib:.2f}",
            None if mfu is None else f"{mfu:.1%}"]


def print_table(r):
    print()
    print(harness.header("scoring throughput", r["env"], f"model: {r['model']}",
                         f"{r['pairs']} CRB-like pairs, max_length {r['max_length']}", f"repeats {r['repeats']}",
                         f"baseline batch {r['batch_size']}", f"engine budget {r['max_tokens_per_batch']}"))
    print(f"engine kernels: {r['kernels']}")
    table = [_side_row("themis_engine", r["engine_pairs_per_s"], r["engine_tokens_per_s"], r["engine_s"],
                       r["engine_peak_gib"], r["engine_mfu"])]
    if "hf_s" in r:
        table.append(_side_row("transformers", r["hf_pairs_per_s"], r["hf_tokens_per_s"], r["hf_s"],
                               r["hf_peak_gib"], None))
    if "fp8" in r:
        f = r["fp8"]
        table.append(_side_row(f"themis_engine fp8 ({f['backend']})", f["pairs_per_s"], f["tokens_per_s"], f["s"],
                               f["peak_gib"], f["mfu"]))
    print(harness.markdown_table(TABLE_HEADERS, table))
    if "hf_s" in r:
        print(f"speedup (pairs/s): {r['speedup']:.2f}x | engine vs transformers scores: max |diff| "
              f"{r['max_abs_diff']:.3g} (mean |score| {r['score_scale']:.3g}), preference agreement "
              f"{r['preference_agreement']:.1%}")
    if "fp8" in r:
        f = r["fp8"]
        print(f"fp8 / bf16 engine: {f['speedup_vs_bf16']:.2f}x | fp8 vs bf16 engine scores: preference agreement "
              f"{f['preference_agreement']:.1%}, correlation {f['score_correlation']:.4f}, max |diff| "
              f"{f['max_abs_diff']:.3g} | weights {f['bytes_saved_gib']:.1f} GiB smaller")
    if "text" in r:
        t = r["text"]
        print(f"\nfrom text ({t['pairs']} CRB-like pairs as strings, tokenizer: {t['tokenizer']}; templating and "
              f"tokenization included; engine tokens computed {t['computed_tokens']} of {t['standalone_tokens']} "
              f"standalone, {t['truncated']} truncated):")
        rows = [["themis_engine, from text", f"{t['engine_pairs_per_s']:.2f}", f"{t['engine_s']:.3f}"]]
        if "hf_s" in t:
            rows.append(["transformers, from text", f"{t['hf_pairs_per_s']:.2f}", f"{t['hf_s']:.3f}"])
        print(harness.markdown_table(["side", "pairs/s", "median s"], rows))
        if "hf_s" in t:
            print(f"speedup from text (pairs/s): {t['speedup']:.2f}x | scores: max |diff| {t['max_abs_diff']:.3g}, "
                  f"preference agreement {t['preference_agreement']:.1%}")
    print(f"token ratio (padded baseline tokens / engine tokens): {r['token_ratio']:.2f} on this run; "
          f"{r['token_ratio_full_workload']:.2f} on the full workload; "
          f"unique {r['unique_tokens']} / standalone {r['standalone_tokens']} / padded {r['padded_tokens']}")


# ================================================================================================
# --mode train: training steps of the same recipe, the trainer's own step vs transformers
# ================================================================================================
class BenchPair:
    """The fields batching.build_micro_batches / global_counts read (data.TokenizedPair's names)."""

    __slots__ = ("chosen_ids", "rejected_ids", "chosen_response_start", "chosen_target_end", "aspect_index", "margin")

    def __init__(self, chosen_ids, rejected_ids, chosen_response_start, aspect_index, margin=0.0):
        self.chosen_ids = chosen_ids  # the standalone chosen sequence (prefix + chosen response)
        self.rejected_ids = rejected_ids
        self.chosen_response_start = chosen_response_start  # = len(prefix): LM on the chosen response
        self.chosen_target_end = -1  # to the end of the sequence (no template closing here)
        self.aspect_index = aspect_index  # the pair's head in the model's criteria
        self.margin = margin


def bench_pairs(work, criteria) -> list[BenchPair]:
    crit = list(criteria)
    return [BenchPair(p + c, p + r, len(p), crit.index(a) if a in crit else -1)
            for p, c, r, a in zip(work.prefix_ids, work.chosen_ids, work.rejected_ids, work.aspects)]


class BenchTrainer(Trainer):
    """A Trainer on the benchmark's model, pairs and batches, so that the timed engine step IS
    Trainer.train_step (-> Trainer.forward_backward per micro-batch, Trainer._clip, the optimizer
    step), on one process.

    Trainer.__init__ is not run: it loads a tokenizer and data files and builds its own model from
    the config. This sets what the step reads instead: the config (objective coefficients, clip,
    token budget), a one-rank DistInfo, the objective and optimizer, the pairs. Two methods are the
    benchmark's: `global_batch` returns its batches in order, and `lr_at` its fixed LR (0 for the
    loss-check step), where the trainer has a shuffled epoch and a warm-up + cosine schedule."""

    def __init__(self, cfg: TrainConfig, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 criteria, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.dist = distributed.DistInfo(rank=0, world=1, device=device)
        self.mixed = False  # pure-bf16 (or float32) parameters, not FSDP's fp32 masters
        self.objective = objective
        self.optimizer = optimizer
        self.criteria = list(criteria)
        self.aspects = self.criteria
        self.args = objective.rm.args
        self._flops_per_token = 3 * linear_flops_per_token(self.args)
        self._peak = None  # no MFU in the step's metrics: the benchmark counts it on unique tokens
        self.use([], [], 0.0)

    def use(self, pairs, batches: list[list[int]], lr: float) -> None:
        """Train on `pairs`, global batch s = batches[s], at the fixed LR `lr`; from step 0."""
        self.train_pairs, self.eval_pairs = pairs, []
        self.batches, self.lr = batches, lr
        self.total_steps = len(batches)
        self.step = 0

    def global_batch(self, step: int) -> list[int]:
        return self.batches[step]

    def lr_at(self, step: int) -> float:
        return self.lr


STEP_KEYS = ("loss", "bt_loss", "magnitude_loss", "lm_loss", "grad_norm")


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


def baseline_step(baseline: HFRecipe, opt, pairs, ids, H, lr, clip):
    """One optimizer step of the baseline over the global batch `ids` (the trainer's sequence:
    global normalisers, forward + backward per micro-batch, clip, step). Returns a float64 tensor
    [loss, bt, magnitude, lm, grad_norm] on the device (no host sync)."""
    bt_norm, lm_norm = batching.global_counts(pairs, ids, H, with_lm=True)
    train_optim.set_lr(opt, lr)
    sums = torch.zeros(4, dtype=torch.float64, device=baseline.device)
    for parts in baseline.forward_backward(pairs, ids, bt_norm, lm_norm, H):
        sums += parts
    params = [p for p in baseline.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.cat([sums, norm.detach().double().reshape(1).to(sums.device)])


def make_optimizer(module: nn.Module, kind: str, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """The trainer's optimizer (train.optim.build_optimizer: AdamW, no weight decay on norms and
    biases), or SGD without momentum over the same parameter groups."""
    if kind == "adamw":
        return train_optim.build_optimizer(module, cfg.optim, fused=fused)
    return torch.optim.SGD(train_optim.param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr,
                           momentum=0.0, **({"fused": True} if fused else {}))


def free(module: nn.Module, device) -> None:
    for p in module.parameters():
        p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_train_config(args: ModelArgs, budget: int, global_batch: int, device) -> TrainConfig:
    """The themis-pm preset with one head per criterion of `args`, the benchmark's budget and batch."""
    cfg = config.apply(TrainConfig(), PRESETS["themis-pm"])
    cfg.objective.heads = "criteria"
    cfg.objective.criteria = list(args.criteria)
    cfg.run.max_tokens_per_batch = budget
    cfg.run.global_batch_pairs = global_batch
    cfg.run.device = device.type
    return cfg


def build_train_models(args: ModelArgs, cfg: TrainConfig, device, dtype, micro_pairs: int):
    """(engine objective, baseline HFRecipe) sharing every weight tensor, the LM head included."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    lm_coef, mu = cfg.objective.lm_coef, cfg.objective.magnitude_coef
    hf_cfg = AutoConfig.for_model(**args.to_hf_config("ForSequenceClassification"))
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForSequenceClassification.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
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
    objective = RewardObjective(rm, lm_coef, mu, cfg.objective.magnitude)
    # the trainer's parallelize: activation checkpointing per block (no compile; one process, no FSDP)
    objective = parallelize(objective, activation_checkpointing=True, compile=False, shard=False)
    objective.train()
    eng_ptrs = sorted(p.data_ptr() for p in objective.parameters())
    hf_ptrs = sorted(p.data_ptr() for p in baseline.parameters())
    if eng_ptrs != hf_ptrs:
        raise RuntimeError("engine and baseline do not share the same weight tensors")
    return objective, baseline


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def main_train(opt: ThroughputConfig, argv=None):
    repeats = opt.repeats or 1
    if opt.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        args = tiny_args(tie_word_embeddings=True)
        # several micro-batches on both sides (global normalisers), an uneven last one in the check batch
        steps, G, W = min(opt.steps, 2), min(opt.global_batch, 4), min(opt.warmup_pairs, 3)
        max_length, budget, micro = min(opt.max_length, 384), 768, min(opt.hf_micro_pairs or 2, 2)
        total_mem = None
    else:
        device, dtype = gpu_or_exit(), torch.bfloat16
        args = ModelArgs.from_name(opt.model)
        steps, G, W = opt.steps, opt.global_batch, opt.warmup_pairs
        max_length, budget = opt.max_length, opt.max_tokens_per_batch
        micro = None
        total_mem = torch.cuda.get_device_properties(0).total_memory
    env = harness.environment(device, "throughput.py", argv)
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
    cfg = bench_train_config(args, budget, G, device)
    clip, lr = cfg.optim.clip, cfg.optim.lr

    work = crb_like_pairs(steps * G, args.vocab_size, max_length=max_length, seed=opt.seed)
    warm = crb_like_pairs(W, args.vocab_size, max_length=max_length, seed=opt.seed + 1)
    pairs, warm_pairs = bench_pairs(work, args.criteria), bench_pairs(warm, args.criteria)
    batches = [list(range(s * G, (s + 1) * G)) for s in range(steps)]
    warm_ids = list(range(len(warm_pairs)))

    objective, baseline = build_train_models(args, cfg, device, dtype, micro)
    trainer = BenchTrainer(cfg, objective, None, args.criteria, device)
    kernels_used = {op: te.kernels.backend_for(op, objective.rm.score.weight) for op in te.kernels.KERNEL_MODULES}

    # 1. the check step of each side at lr 0 (weights unchanged: both see the initial weights)
    trainer.optimizer = make_optimizer(objective, kind, cfg, fused)
    trainer.use(warm_pairs, [warm_ids], 0.0)
    metrics = trainer.train_step()
    eng_check = [float(metrics[k]) for k in STEP_KEYS]
    trainer.optimizer = None
    free(objective, device)
    rows = {}
    if not opt.skip_baseline:
        harness.reset_peak_memory(device)
        o = make_optimizer(baseline, kind, cfg, fused)
        hf_check = baseline_step(baseline, o, warm_pairs, warm_ids, H, 0.0, clip).cpu().tolist()
        # 2. transformers timed (its check step was its warm-up)
        hf_out = []

        def hf_steps():
            hf_out[:] = [baseline_step(baseline, o, pairs, ids, H, lr, clip) for ids in batches]

        t_hf = harness.benchmark(hf_steps, device, repeats=repeats, warmup=0)
        hf_losses = torch.stack(hf_out).cpu().tolist()
        hf_mem = harness.peak_memory_gib(device)
        del o
        free(baseline, device)
        diffs = {k: rel_diff(a, b) for k, a, b in zip(("loss", "bt", "magnitude", "lm", "grad_norm"),
                                                      eng_check, hf_check)}
        rows.update(hf_s=t_hf.median_s, hf_times=t_hf.times_s, hf_peak_gib=hf_mem,
                    hf_step_losses=[x[0] for x in hf_losses], hf_check=hf_check, check_rel_diff=diffs,
                    first_step_max_rel_diff=max(diffs[k] for k in ("loss", "bt", "magnitude", "lm")))
    # 3. the engine timed, after one more warm-up step (its optimizer state was freed)
    harness.reset_peak_memory(device)
    trainer.optimizer = make_optimizer(objective, kind, cfg, fused)
    trainer.use(warm_pairs, [warm_ids], lr)
    trainer.train_step()
    eng_out = []

    def engine_steps():
        trainer.use(pairs, batches, lr)
        eng_out[:] = [trainer.train_step() for _ in batches]

    t_eng = harness.benchmark(engine_steps, device, repeats=repeats, warmup=0)
    eng_mem = harness.peak_memory_gib(device)
    trainer.optimizer = None
    free(objective, device)

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
    peak_tf = harness.peak_tflops(device, opt.peak_tflops)

    def mfu(t):
        return train_flops / t / (peak_tf * 1e12) if peak_tf else float("nan")

    # the token ratio of the full-size default workload needs no model: print it in every mode
    if opt.cpu:
        full = crb_like_pairs(opt.steps * opt.global_batch, 151936, max_length=opt.max_length, seed=opt.seed)
        ratio_full = full.padded_tokens(2 * (opt.hf_micro_pairs or 4)) / full.unique_tokens()
    else:
        ratio_full = padded / unique
    n_pairs, t = steps * G, t_eng.median_s
    rows.update(
        env=env, mode="train", card=env["card"], model="tiny" if opt.cpu else opt.model, steps=steps,
        global_batch=G, repeats=repeats, max_length=max_length, warmup_pairs=W, hf_micro_pairs=micro,
        max_tokens_per_batch=budget, optimizer=kind, optimizer_auto=auto, lr=lr, betas=list(cfg.optim.betas),
        eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, lm_coef=cfg.objective.lm_coef,
        magnitude_coef=cfg.objective.magnitude_coef, clip=clip, dtype=str(dtype).replace("torch.", ""),
        tied=args.tie_word_embeddings, params=n_params, kernels=kernels_used,
        engine_step=f"{Trainer.__module__}.Trainer.train_step",
        engine_s=t, engine_times=t_eng.times_s, engine_peak_gib=eng_mem,
        engine_pairs_per_s=n_pairs / t, engine_tokens_per_s=unique / t, engine_mfu=mfu(t),
        engine_step_losses=[m["loss"] for m in eng_out], engine_check=eng_check,
        unique_tokens=unique, standalone_tokens=standalone, padded_tokens=padded, lm_tokens=lm_tokens,
        train_flops=train_flops, engine_micro_batches=eng_mbs, hf_micro_batches=hf_mbs,
        token_ratio=padded / unique, token_ratio_full_workload=ratio_full,
    )
    if "hf_s" in rows:
        rows.update(hf_pairs_per_s=n_pairs / rows["hf_s"], hf_tokens_per_s=standalone / rows["hf_s"],
                    hf_mfu=mfu(rows["hf_s"]), speedup=rows["hf_s"] / t)
    print_train_table(rows)
    harness.write_json(opt.json, rows)
    objective = baseline = trainer = None
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
        opt_txt = (f"SGD{' fused' if gpu else ''}, no momentum (lr {r['lr']:g}, wd {r['weight_decay']:g} but norms; "
                   f"no state{': AdamW would not fit in half the card' if r['optimizer_auto'] else ''})")
    print()
    print(harness.header(
        "training throughput", r["env"],
        f"model: {r['model']} ({r['params'] / 1e9:.2f}B params, LM head {'tied' if r['tied'] else 'untied'})",
        f"{r['steps']} steps x {r['global_batch']} CRB-like pairs, max_length {r['max_length']}",
        f"repeats {r['repeats']}",
        f"baseline micro-batch {r['hf_micro_pairs']} pairs ({2 * r['hf_micro_pairs']} padded sequences)",
        f"engine budget {r['max_tokens_per_batch']} tokens"))
    prec = ("both sides train pure-bf16 parameters (no fp32 master copy), optimizer math in fp32"
            if gpu else f"both sides {r['dtype']}")
    print(f"recipe (both sides): BT + {r['magnitude_coef']:g}*magnitude(centering) + {r['lm_coef']:g}*LM(chosen "
          f"response), a head per criterion, global normalisers, clip {r['clip']:g}, activation checkpointing | "
          f"optimizer: {opt_txt} | precision: {prec}")
    print(f"engine step: {r['engine_step']} | engine kernels: {r['kernels']}")
    table = [_side_row("themis_engine", r["engine_pairs_per_s"], r["engine_tokens_per_s"], r["engine_s"],
                       r["engine_peak_gib"], r["engine_mfu"])]
    if "hf_s" in r:
        table.append(_side_row("transformers", r["hf_pairs_per_s"], r["hf_tokens_per_s"], r["hf_s"],
                               r["hf_peak_gib"], r["hf_mfu"]))
    print(harness.markdown_table(TABLE_HEADERS, table))
    if "hf_s" in r:
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
