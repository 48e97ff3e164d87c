"""The trainer's pieces on their own: parallelize (activation checkpointing and compile keep names and
numbers), the optimizer groups and LR schedule, the checkpoint manager's cadence, the validation's
grouping, and the model config (named shapes + overrides, presets, the earlier shape flags)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from train_helpers import tiny_objective, token_pairs

from themis_engine.config import ConfigError, apply
from themis_engine.eval.results import grouped_accuracy
from themis_engine.model.args import DEFAULT_CRITERIA, ModelArgs
from themis_engine.model.decoder import RewardModel
from themis_engine.train import microbatch, optim
from themis_engine.train.__main__ import parse_config, split_legacy_shape_flags
from themis_engine.train.checkpoint import CheckpointManager
from themis_engine.train.config import PRESETS, OptimSection, ShapeOverrides, TrainConfig
from themis_engine.train.parallelize import parallelize, plain_name, wants_activation_checkpointing
from themis_engine.train.validate import Validator, accuracy_cells

H = 3


def _pairs(n=9, seed=0):
    return token_pairs(n, seed, languages=["Python", "Go", None])


def _objective(seed=0):
    return tiny_objective(seed=seed)


def _loss_and_grads(obj, pairs):
    obj.zero_grad()
    ids = list(range(len(pairs)))
    bt_norm, lm_norm = microbatch.global_counts(pairs, ids, H, True)
    total = 0.0
    for mb in microbatch.build_micro_batches(pairs, ids, 48, H, True):
        loss, _, _ = obj(**mb.to_torch("cpu"), bt_normalizer=bt_norm, lm_normalizer=lm_norm)
        loss.backward()
        total += float(loss.detach())
    return total, {plain_name(n): p.grad.clone() for n, p in obj.named_parameters()}


# ----------------------------------------------------------------------------------- parallelize
@pytest.mark.parametrize("compile", [False, True])
def test_activation_checkpointing_and_compile_keep_names_and_numbers(compile):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    pairs = _pairs()
    plain = _objective()
    wrapped = parallelize(copy.deepcopy(plain), activation_checkpointing=True, compile=compile,
                          compile_backend="eager")
    assert type(wrapped.rm.model.layers[0]).__name__ != "Block"  # the block really is wrapped
    assert "_checkpoint_wrapped_module" in next(n for n, _ in wrapped.named_parameters() if "layers.0" in n)
    dcp_names = list(get_model_state_dict(wrapped))  # what checkpoints and the export hold
    assert list(get_model_state_dict(plain)) == list(plain.state_dict())
    if compile:  # the same names (DCP strips _orig_mod.), listed in another order
        assert sorted(dcp_names) == sorted(plain.state_dict())
    else:  # the same order too; the checkpoint wrapper's own state_dict hook strips its prefix
        assert dcp_names == list(plain.state_dict()) == list(wrapped.state_dict())
    assert [plain_name(n) for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    loss_a, grads_a = _loss_and_grads(plain, pairs)
    loss_b, grads_b = _loss_and_grads(wrapped, pairs)
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    # a wrapped model loads a plain state dict the way resume does (a run without AC / compile)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.no_grad():
        for p in wrapped.parameters():
            p.zero_()
    set_model_state_dict(wrapped, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in get_model_state_dict(wrapped).items())
    if not compile:
        wrapped.load_state_dict(plain.state_dict())


def test_activation_checkpointing_recomputes_blocks_in_the_backward():
    from themis_engine.model.decoder import Block

    pairs = _pairs(3)
    obj = parallelize(_objective(), activation_checkpointing=True)
    calls = []
    # a pre-hook: the recomputation stops early, once it has what the backward needs
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: calls.append(torch.is_grad_enabled()) if isinstance(m, Block) else None)
    try:
        _loss_and_grads(obj, pairs)
        n_train = len(calls)
        with torch.no_grad():
            mb = microbatch.build_micro_batches(pairs, range(3), 10_000, H, False)[0]
            obj(**mb.to_torch("cpu"), bt_normalizer=1.0, lm_normalizer=1.0)
    finally:
        handle.remove()
    n_mb = len(microbatch.build_micro_batches(pairs, range(3), 48, H, True))
    assert n_train == 2 * 2 * n_mb  # 2 blocks, each run again in the backward
    assert len(calls) - n_train == 2  # evaluation: once per block, no recomputation


def test_activation_checkpointing_default_is_by_size():
    rm = _objective().rm
    assert not wants_activation_checkpointing(rm, None)
    assert wants_activation_checkpointing(rm, True) and not wants_activation_checkpointing(rm, False)
    with torch.device("meta"):
        big = RewardModel(ModelArgs.from_name("qwen3-1.7b"))
    assert wants_activation_checkpointing(big, None)


# ----------------------------------------------------------------------------------- optimizer
def test_param_groups_skip_decay_on_norms_and_biases_even_when_wrapped():
    obj = _objective()
    groups = optim.param_groups(obj, 0.1)
    names = {id(p): n for n, p in obj.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    kept = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all("norm" in n for n in kept) and kept
    assert all(p.ndim == 2 and "norm" not in n for n, p in obj.named_parameters() if n in decayed)
    wrapped = parallelize(copy.deepcopy(obj), activation_checkpointing=True)
    wgroups = optim.param_groups(wrapped, 0.1)
    assert [len(g["params"]) for g in wgroups] == [len(g["params"]) for g in groups]
    wnames = {id(p): plain_name(n) for n, p in wrapped.named_parameters()}
    assert sorted(wnames[id(p)] for p in wgroups[1]["params"]) == kept


def test_lr_schedule_warms_up_then_cosine_to_the_terminal_lr():
    cfg = OptimSection(lr=1e-3, terminal_lr=1e-5, warmup_fraction=0.1)
    total = 40
    lrs = [optim.lr_at(s, total, cfg) for s in range(total)]
    assert optim.warmup_steps(cfg, total) == 4
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    mid = 4 + (total - 4 - 1) / 2  # half-way through the cosine: the mean of peak and terminal
    assert optim.lr_at(mid, total, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    no_warm = OptimSection(lr=1e-3, terminal_lr=0.0, warmup_fraction=0.0)
    assert optim.lr_at(0, 10, no_warm) == 1e-3 and optim.lr_at(9, 10, no_warm) == pytest.approx(0.0, abs=1e-18)


# ----------------------------------------------------------------------------------- checkpoints
def test_checkpoint_manager_owns_the_cadence_and_pruning(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = {"step": 0}
    manager = CheckpointManager(tmp_path, model, opt, lambda: dict(state), every=3, keep=2)
    written = []
    for step in range(1, 8):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        state["step"] = step
        if manager.save(step, last_step=step == 7) is not None:
            written.append(step)
    assert written == [3, 6, 7]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000006", "step_000007"]
    assert manager.save(5) is None and manager.save(5, force=True).name == "step_000005"
    assert manager.latest().name == "step_000007"  # the newest step, not the newest file
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()
    assert manager.load()["step"] == 7
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
    only_last = CheckpointManager(tmp_path / "b", model, opt, lambda: dict(state), every=0)
    assert [s for s in range(1, 5) if only_last.save(s, last_step=s == 4)] == [4]
    assert CheckpointManager(tmp_path / "empty", model, opt, dict).load() is None


# ----------------------------------------------------------------------------------- validation
def test_grouped_accuracy_and_cells():
    assert grouped_accuracy([4.0, 0.0, 3.0], [3.0, 0.0, 1.0], ["a", "b", "c"]) == {"a": 0.75, "c": 1 / 3}
    p = SimpleNamespace(aspect_index=-1)
    assert accuracy_cells(p, 3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert accuracy_cells(SimpleNamespace(aspect_index=1), 3, 3) == [(1, 1)]
    # scalar mode: one head, the pair's aspect group, "unlabelled" (the last) without one
    assert accuracy_cells(SimpleNamespace(aspect_index=1), 1, 4) == [(0, 1)]
    assert accuracy_cells(p, 1, 4) == [(0, 3)]


def test_validation_agrees_with_the_evaluators_grouping():
    """Per criterion and per language accuracy equal those of eval/results.compile_results on the same
    (pair, head) cells, to its 4 decimals; reward mean/std are those of all chosen and rejected rewards."""
    from themis_engine.eval.results import compile_results

    pairs = _pairs(23, seed=5)
    obj = _objective(seed=2)
    validator = Validator(obj, ["a", "b", "c"], ["a", "b", "c"], max_tokens_per_batch=64, device="cpu")
    out = validator(pairs)
    chosen, rejected, aspect, language, every = [], [], [], [], []
    with torch.no_grad():
        for ids, rc, rr in validator._rewards(pairs):
            every += [rc, rr]
            for row, i in enumerate(ids):
                for h, _ in accuracy_cells(pairs[i], H, H):
                    chosen.append(float(rc[row, h]))
                    rejected.append(float(rr[row, h]))
                    aspect.append("abc"[h])
                    language.append(pairs[i].language or "unknown")
    ref = compile_results(chosen, rejected, aspect, language, ["s"] * len(chosen))
    assert round(out["eval/accuracy"], 4) == ref["overall"]["accuracy"]
    for name, row in ref["by_aspect"].items():
        assert round(out[f"eval/accuracy/{name}"], 4) == row["accuracy"], name
    for lang, row in ref["by_language"].items():
        assert round(out[f"eval/accuracy_language/{lang}"], 4) == row["accuracy"], lang
    both = torch.cat(every)
    for h, name in enumerate("abc"):
        assert out[f"eval/reward_mean/{name}"] == pytest.approx(float(both[:, h].mean()), rel=1e-12)
        assert out[f"eval/reward_std/{name}"] == pytest.approx(float(both[:, h].std(unbiased=False)), rel=1e-9)
    assert validator.reward_stats["b"]["mean"] == out["eval/reward_mean/b"]
    assert obj.training  # left in training mode
    assert validator([]) == {}
    assert Validator(obj, "abc", "abc", max_tokens_per_batch=64, device="cpu", every=5).due(5, 6)
    assert not Validator(obj, "abc", "abc", max_tokens_per_batch=64, device="cpu", every=5).due(5, 5)


# ----------------------------------------------------------------------------------- config
def test_demo_preset_is_the_demo_shape_of_before():
    cfg = apply(TrainConfig(), PRESETS["demo"])
    assert cfg.model.shape_name() == "demo" and not cfg.model.overrides
    shape = cfg.model.shape()
    # the shape fields the demo preset listed before model.path named shapes
    before = dict(family="qwen3", hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                  intermediate_size=192, rope_theta=1_000_000.0, rms_norm_eps=1e-6, rope_scaling=None,
                  tie_word_embeddings=False, attention_bias=False, o_bias=False, mlp_bias=False)
    assert {k: getattr(shape, k) for k in before} == before
    default = TrainConfig().model.shape()  # the trainer's default from-scratch shape, as before
    assert (default.hidden_size, default.intermediate_size, default.head_dim) == (128, 256, 32)


def test_named_shape_overrides():
    cfg = parse_config(["--preset", "demo", "--model.overrides={num_layers: 3, family: llama, rope_theta: 1e4}"])
    shape = cfg.model.shape()
    assert (shape.num_layers, shape.family, shape.rope_theta, shape.hidden_size) == (3, "llama", 1e4, 96)
    assert isinstance(cfg.model.overrides["num_layers"], int)
    assert json.loads(json.dumps(asdict(cfg)))["model"]["overrides"] == {"num_layers": 3, "family": "llama",
                                                                         "rope_theta": 1e4}
    json_form = parse_config(["--model.path=qwen3-0.6b", '--model.overrides={"num_layers": 2}'])
    assert json_form.model.shape().num_layers == 2 and json_form.model.shape().hidden_size == 1024
    for bad, match in (("{vocab_size: 10}", "set by the trainer"), ("{layers: 2}", "not a shape field"),
                       ("{num_layers: two}", "model.overrides.num_layers"), ("{family: gpt}", "family"),
                       ("[1, 2]", "expected a mapping")):
        with pytest.raises(ConfigError, match=match):
            parse_config([f"--model.overrides={bad}"])
    with pytest.raises(ConfigError, match="neither a checkpoint folder nor a named shape"):
        parse_config(["--model.path=qwen9-1b"])


def test_overrides_are_refused_for_a_checkpoint_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert parse_config([f"--model.path={tmp_path}"]).model.shape_name() is None
    with pytest.raises(ConfigError, match="apply to a named shape"):
        parse_config([f"--model.path={tmp_path}", "--model.overrides={num_layers: 2}"])


def test_earlier_shape_flags_still_work_as_overrides():
    argv = ["--preset", "demo", "--model.hidden_size=64", "--model.num-layers", "3", "--run.max_steps=2",
            "--model.overrides={head_dim: 16}"]
    rest, legacy = split_legacy_shape_flags(argv)
    assert rest == ["--preset", "demo", "--run.max_steps=2", "--model.overrides={head_dim: 16}"]
    assert legacy == {"hidden_size": "64", "num_layers": "3"}
    cfg = parse_config(argv)
    assert cfg.model.overrides == {"head_dim": 16, "hidden_size": 64, "num_layers": 3}
    assert cfg.run.max_steps == 2 and cfg.model.shape().hidden_size == 64
    with pytest.raises(ConfigError, match="needs a value"):
        parse_config(["--model.hidden_size"])


def test_presets_are_built_with_keywords():
    pm = PRESETS["themis-pm"]
    assert pm["optim"]["lr"] == 1e-5 and pm["objective"]["lm_coef"] == 0.25 and pm["run"]["global_batch_pairs"] == 512
    assert PRESETS["themis-pt"]["data"]["max_length"] == 2560 and PRESETS["themis-pt"]["optim"]["clip"] == 2.0
    from themis_engine.train import config as train_config

    with pytest.raises(TypeError):
        train_config._stage(2e-5, 1e-5, 0.4, 0.01, 2.0, 1024, 2560, 2)  # positional: refused


def test_shape_overrides_round_trip():
    o = ShapeOverrides({"num_layers": "4"})
    assert o == {"num_layers": 4} and ShapeOverrides(o.items()) == o and copy.deepcopy(o) == o
    assert ShapeOverrides("") == {} and ShapeOverrides("{}") == {}
    assert math.isclose(ShapeOverrides("{rms_norm_eps: 1e-5}")["rms_norm_eps"], 1e-5)
    assert DEFAULT_CRITERIA  # the named shapes' heads are replaced by the trainer's criteria
