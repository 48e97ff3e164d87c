"""The evaluator's config and its public names: EvalConfig.check, the command line (--compare with
several values), the Scorer a run builds (no budget given: the Scorer's default rule)."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import make_checkpoint

import themis_engine.eval as ev
from themis_engine import DEFAULT_CRITERIA
from themis_engine.errors import ConfigError, EvalError
from themis_engine.eval import EvalConfig, parse


def test_public_names():
    import themis_engine.eval.run as run_module

    assert isinstance(ev.run, types.ModuleType) and ev.run is run_module  # the module, not shadowed
    assert ev.evaluate is run_module.run and ev.main is run_module.main
    assert ev.EvalError is EvalError and run_module.EvalError is EvalError
    assert run_module.EvalConfig is EvalConfig and run_module.parse is parse
    for name in ev.__all__:
        assert hasattr(ev, name), name


@pytest.mark.parametrize("argv, message", [
    (["--data", "d", "--output", "o"], "MODEL is required"),
    (["m", "--output", "o"], "--data is required"),
    (["m", "--data", "d"], "--output is required"),
    (["m", "--data", "d", "--output", "o", "--chunk-size", "0"], "--chunk-size must be at least 1"),
    (["m", "--data", "d", "--output", "o", "--max-length", "1"], "--max-length must be at least 2"),
    (["m", "--data", "d", "--output", "o", "--dtype", "fp64"], "--dtype 'fp64'"),
    (["m", "--data", "d", "--output", "o", "--criteria-prompts", "p.json"], "has no effect without"),
])
def test_check_names_the_option(argv, message, capsys):
    with pytest.raises(ConfigError, match=message):
        parse(argv).check()
    assert ev.main(argv) == 2
    assert message in capsys.readouterr().err


def test_compare_takes_several_values():
    cfg = parse(["m", "--data", "d", "--output", "o", "--compare", "a", "b", "--limit", "3"])
    assert cfg.compare == ["a", "b"] and cfg.limit == 3
    assert parse(["m", "--data", "d", "--output", "o", "--compare=x,y"]).compare == ["x", "y"]
    assert parse(["m", "--data", "d", "--output", "o"]).compare == []


def test_the_run_scorer_uses_the_default_budget_rule(tmp_path):
    ckpt = make_checkpoint(tmp_path, "rm", criteria=list(DEFAULT_CRITERIA))
    cfg = parse([str(ckpt), "--data", "d", "--output", "o", "--max-length", "300", "--dtype", "fp32",
                 "--on-overflow", "error"])
    scorer = ev.load_scorer(cfg, "cpu")
    assert (scorer.max_length, scorer.on_overflow, scorer.model.dtype) == (300, "error", torch.float32)
    assert scorer.max_tokens_per_batch is None  # the Scorer's default: budget.default_token_budget off CUDA
    given = ev.load_scorer(parse([str(ckpt), "--data", "d", "--output", "o", "--max-tokens-per-batch", "64"]), "cpu")
    assert given.max_tokens_per_batch == 64
    fp = ev.fingerprint(cfg, scorer)
    assert (fp["max_length"], fp["on_overflow"], fp["dtype"]) == (300, "error", "float32")
