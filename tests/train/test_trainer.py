"""The trainer end to end on CPU: resume is exact, 2 processes equal 1, a NaN stops the run with the
last good checkpoint intact, the export scores the same in transformers and the scorer, and the
demo preset learns its synthetic set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import themis_engine as te
from themis_engine.config import apply
from themis_engine.train.config import ShapeOverrides, TrainConfig
from themis_engine.train.trainer import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "model": {"path": "tiny", "overrides": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                            "head_dim": 8, "intermediate_size": 64}, "dtype": "float32"},
    "data": {"synthetic_pairs": 48, "eval_fraction": 0.25, "max_length": 256},
    "objective": {"heads": "criteria", "lm_coef": 0.1, "magnitude_coef": 0.01},
    "optim": {"lr": 3e-3, "terminal_lr": 3e-4, "clip": 1.0},
    "run": {"global_batch_pairs": 12, "max_tokens_per_batch": 1024, "max_steps": 4, "progress": False,
            "device": "cpu", "checkpoint_every": 0, "export": False},
}


def _cfg(output, **overrides) -> TrainConfig:
    cfg = apply(TrainConfig(), SMALL)
    cfg.run.output = str(output)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.objective.state_dict().items()}


def test_resume_is_exact(tmp_path):
    full = Trainer(_cfg(tmp_path / "full"))
    whole = full.fit()["history"]

    first = Trainer(_cfg(tmp_path / "cut"))
    part = [first.train_step() for _ in range(2)]
    first.save_checkpoint()
    del first  # the run "stops" here
    second = Trainer(_cfg(tmp_path / "cut", run__resume=True))
    rest = second.fit()["history"]
    assert second.step == 4 and len(rest) == 2
    losses = [m["loss"] for m in part + rest]
    assert losses == pytest.approx([m["loss"] for m in whole], rel=0, abs=1e-12)
    a, b = _weights(full), _weights(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    t = Trainer(_cfg(tmp_path, run__checkpoint_every=1, run__keep_checkpoints=2))
    t.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000003", "step_000004"]
    assert (tmp_path / "metrics.jsonl").is_file()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines[:4]] == [1, 2, 3, 4]
    for key in ("loss", "bt_loss", "lm_loss", "magnitude_loss", "lr", "grad_norm", "tokens_per_s", "pairs_per_s"):
        assert key in lines[0], key
    assert lines[-1].get("final") and "eval/accuracy" in lines[-1]


def test_activation_checkpointing_changes_neither_numbers_nor_names(tmp_path):
    """Blocks wrapped for recomputation (parallelize) train to the same losses, evaluation, checkpoint
    and export as plain blocks, with the same tensor names; a run with it resumes from one without."""
    import shutil

    from safetensors.torch import load_file

    runs = {}
    for ac in (False, True):
        out = tmp_path / f"ac_{ac}"
        t = Trainer(_cfg(out, model__activation_checkpointing=ac, run__export=True, run__checkpoint_every=3))
        assert (type(t.rm.model.layers[0]).__name__ == "Block") is (not ac)
        runs[ac] = (t, t.fit(), out)
    (plain, a, out_a), (_, b, out_b) = runs[False], runs[True]
    assert [m["loss"] for m in a["history"]] == [m["loss"] for m in b["history"]]
    assert a["final"] == b["final"]
    for out in (out_a, out_b):  # the manager's cadence: every 3 steps and the last one
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    ea, eb = (load_file(str(out / "export" / "model.safetensors")) for out in (out_a, out_b))
    assert list(ea) == list(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)
    ca = torch.load(out_a / "checkpoints" / "step_000004" / "model.pt", weights_only=True)
    cb = torch.load(out_b / "checkpoints" / "step_000004" / "model.pt", weights_only=True)
    assert list(ca) == list(cb) and all(torch.equal(ca[k], cb[k]) for k in ca)
    assert all(k.startswith("rm.") and "_checkpoint_wrapped_module" not in k for k in cb)
    oa = torch.load(out_a / "checkpoints" / "step_000004" / "optim.pt", weights_only=True)
    ob = torch.load(out_b / "checkpoints" / "step_000004" / "optim.pt", weights_only=True)
    assert list(oa["state"]) == list(ob["state"]) and oa["param_groups"] == ob["param_groups"]
    # resume with activation checkpointing from the plain run's step 3
    cut = tmp_path / "cut"
    shutil.copytree(out_a / "checkpoints" / "step_000003", cut / "checkpoints" / "step_000003")
    again = Trainer(_cfg(cut, model__activation_checkpointing=True, run__resume=True))
    rest = again.fit()["history"]
    assert [m["loss"] for m in rest] == [m["loss"] for m in a["history"][3:]]
    assert all(torch.equal(v, _weights(plain)[k]) for k, v in _weights(again).items())


def test_non_finite_loss_stops_with_last_checkpoint_intact(tmp_path, monkeypatch):
    t = Trainer(_cfg(tmp_path, run__checkpoint_every=1))
    real = t.objective.forward

    def poisoned(*args, **kwargs):
        loss, bt, lm = real(*args, **kwargs)
        return (loss * float("nan") if t.step == 2 else loss), bt, lm

    monkeypatch.setattr(t.objective, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"step 3: non-finite loss"):
        t.fit()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts[-1] == "step_000002"
    state = json.loads((tmp_path / "checkpoints" / "step_000002" / "trainer.json").read_text())
    assert state["step"] == 2


def test_export_scores_the_same_in_transformers_and_the_scorer(tmp_path):
    t = Trainer(_cfg(tmp_path, run__export=True))
    t.fit()
    export = tmp_path / "export"
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForSequenceClassification"] and cfg["num_labels"] == 5
    assert set(cfg["reward_stats"]) == set(t.criteria)
    scorer = te.Scorer.from_pretrained(export, device="cpu", dtype=torch.float32)
    assert scorer.criteria == t.criteria
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(export), dtype=torch.float32).eval()
    convs = [[{"role": "user", "content": "Sum a list."}, {"role": "assistant", "content": c}]
             for c in ("def f(xs): return sum(xs)", "x = eval(input())")]
    ours = scorer.score(convs)
    ids = [scorer.tokenize([c])[0] for c in convs]
    with torch.no_grad():
        theirs = torch.cat([hf(torch.tensor([x])).logits for x in ids])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bad_data_errors_name_the_problem(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.data.synthetic_pairs = 0
    cfg.data.train = [str(tmp_path / "missing.jsonl")]
    cfg.model.tokenizer = str(_tokenizer_dir(tmp_path))
    with pytest.raises(Exception, match="missing.jsonl"):
        Trainer(cfg)
    bad = tmp_path / "bad.jsonl"
    aspect = "Functional_Correctness"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "aspect": aspect}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "", "rejected": "b", "aspect": aspect}) + "\n")
    cfg.data.train = [str(bad)]
    with pytest.raises(Exception, match=r"bad.jsonl.*(row|line) 2.*chosen"):
        Trainer(cfg)


def _tokenizer_dir(tmp_path):
    from themis_engine.testing.tiny import build_tokenizer

    path = tmp_path / "tok"
    build_tokenizer(path)
    return path


def _run_cli(args, env_extra=None, nproc=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 1000), "-m", "themis_engine.train"] if nproc
           else [sys.executable, "-m", "themis_engine.train"])
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _flat_args(output):
    args = []
    for section, values in SMALL.items():
        for k, v in values.items():
            args.append(f"--{section}.{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}")
    return args + [f"--run.output={output}", "--run.export=true"]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one = _run_cli(_flat_args(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run_cli(_flat_args(tmp_path / "two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    m1, m2 = read(tmp_path / "one"), read(tmp_path / "two")
    assert len(m1) == len(m2)
    for a, b in zip(m1, m2):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "one" / "export" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "export" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_demo_preset_learns(tmp_path):
    """The README's main job: the demo preset, as shipped, beats 80% held-out accuracy."""
    res = _run_cli(["--preset", "demo", f"--run.output={tmp_path}", "--run.progress=false"])
    assert res.returncode == 0, res.stderr[-3000:]
    final = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    print(res.stdout[-2000:])
    assert final["eval/accuracy"] >= 0.80, final


def test_scalar_heads_report_per_aspect_and_finetune_from_export(tmp_path):
    t = Trainer(_cfg(tmp_path / "scalar", objective__heads="scalar", run__export=True))
    final = t.fit()["final"]
    assert t.criteria == ["reward"]
    per_aspect = [k for k in final if k.startswith("eval/accuracy/")]
    assert per_aspect and all(k.split("/")[-1] in t.aspects + ["unlabelled"] for k in per_aspect)
    export = tmp_path / "scalar" / "export"
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["num_labels"] == 1 and cfg["themis_heads"] == "scalar"
    # continue from the exported classifier (no LM head there, so lm_coef must be 0)
    cont = _cfg(tmp_path / "cont", objective__heads="scalar", objective__lm_coef=0.0)
    cont.model.path, cont.model.overrides = str(export), ShapeOverrides()  # the folder gives the shape
    t2 = Trainer(cont)
    before = {k: v.clone() for k, v in t2.rm.state_dict().items()}
    t2.fit()
    assert any(not torch.equal(before[k], v) for k, v in t2.rm.state_dict().items())
    bad = _cfg(tmp_path / "bad", objective__heads="scalar")
    bad.model.path, bad.model.overrides = str(export), ShapeOverrides()
    with pytest.raises(TrainingError, match="no LM head"):
        Trainer(bad)


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_bf16_training_and_export(tmp_path):
    """On CUDA: float32 master weights on the one-rank FSDP2 group, bf16 compute through the Triton
    kernels (forward and backward), fused AdamW; the losses stay finite, the weights move, and the
    export scores in the scorer on the card as it does in float32 on the CPU (to bf16 rounding)."""
    # head_dim 16: a head size the Triton attention kernel takes (SMALL's 8 would run on the reference)
    cfg = _cfg(tmp_path, model__dtype="bfloat16", run__device="cuda", run__export=True, run__max_steps=6)
    cfg.model.overrides = ShapeOverrides({**cfg.model.overrides, "head_dim": 16})
    t = Trainer(cfg)
    assert t.mixed and t.device.type == "cuda"
    before = _weights(t)
    t.fit()
    after = _weights(t)
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(x)) for x in losses), losses
    convs = [[{"role": "user", "content": "Sum a list."}, {"role": "assistant", "content": c}]
             for c in ("def f(xs): return sum(xs)", "x = eval(input())")]
    gpu = te.Scorer.from_pretrained(tmp_path / "export", device="cuda", dtype=torch.bfloat16).score(convs)
    cpu = te.Scorer.from_pretrained(tmp_path / "export", device="cpu", dtype=torch.float32).score(convs)
    # scores are ~1e-2 here; bf16 vs float32 differed by ~5e-4 on the CPU
    torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=3e-3)


@pytest.mark.gpu
def test_gpu_demo_preset_learns(tmp_path):
    """The README's main job on a card: the demo preset in bf16 on CUDA beats 80% held-out accuracy."""
    res = _run_cli(["--preset", "demo", f"--run.output={tmp_path}", "--run.progress=false", "--run.device=cuda",
                    "--model.dtype=bfloat16"])
    assert res.returncode == 0, res.stderr[-3000:]
    final = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["eval/accuracy"] >= 0.80, final


def test_bf16_fsdp_keeps_rope_frequencies_float32(tmp_path, monkeypatch):
    """The CUDA recipe (FSDP2, bf16 compute, activation checkpointing) on one CPU rank: each block must
    get the rotary inv_freq in float32 (a bf16 copy turns the angle at position 4000 off by radians),
    while its weights and the residual stream are bf16."""
    from themis_engine.model.decoder import MLP, Attention

    monkeypatch.setattr(Trainer, "mixed", property(lambda self: True, lambda self, value: None), raising=False)
    seen, weights = [], []

    def record(module, args):  # modules inside a block: after FSDP's cast of the block's inputs
        if isinstance(module, Attention):
            seen.append((args[0].dtype, args[3].dtype))
        elif isinstance(module, MLP):
            weights.append((args[0].dtype, module.up_proj.weight.dtype))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        t = Trainer(_cfg(tmp_path, model__activation_checkpointing=True, run__max_steps=1))
        t.fit()
    finally:
        handle.remove()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert seen and weights, "no block ran"
    assert all(h == torch.bfloat16 and inv == torch.float32 for h, inv in seen), seen
    assert all(x == torch.bfloat16 and w == torch.bfloat16 for x, w in weights), weights
