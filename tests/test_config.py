"""The shared config system: dataclasses, YAML, presets, --section.key overrides, --help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from themis_engine.config import ConfigError, option, parse_args, section


@dataclass
class Optim:
    """Optimizer settings."""

    lr: float = option(1e-5, "peak learning rate")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    fused: bool = option(True, "fused AdamW on CUDA")


@dataclass
class Cfg:
    model: str = option("", "model folder", positional=True)
    steps: int = option(10, "optimizer steps")
    magnitude: Literal["centering", "abs"] = option("centering", "reward-magnitude form")
    limit: Optional[int] = option(None, "rows to use")
    use_system_prompts: bool = option(False, "prepend the all-criteria prompt")
    optim: Optim = section(Optim)


PRESETS = {"fast": {"steps": 2, "optim": {"lr": 3e-4}}}


def test_overrides_files_and_presets(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\noptim:\n  lr: 2.0e-5\n  betas: [0.8, 0.9]\n")
    cfg = parse_args(Cfg, ["path/to/m", "--preset", "fast", "--config", str(f), "--optim.fused=false",
                           "--limit", "7", "--use-system-prompts", "--magnitude=abs"], presets=PRESETS)
    assert cfg.model == "path/to/m" and cfg.steps == 5 and cfg.optim.lr == 2e-5
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.fused is False
    assert cfg.limit == 7 and cfg.use_system_prompts is True and cfg.magnitude == "abs"
    assert parse_args(Cfg, ["--preset=fast"], presets=PRESETS).optim.lr == 3e-4
    assert parse_args(Cfg, ["--limit=none"]).limit is None


@pytest.mark.parametrize("argv,match", [
    (["--optim.lrr=1"], r"unknown option --optim.lrr"),
    (["--lr=1"], r"did you mean --optim.lr"),
    (["--steps=abc"], r"steps: expected int, got 'abc'"),
    (["--steps=1.5"], r"steps: expected int"),
    (["--magnitude=square"], r"magnitude: 'square' is not one of centering, abs"),
    (["--optim.fused=maybe"], r"optim.fused: expected true or false"),
    (["--preset=slow"], r"unknown preset 'slow'; known: fast"),
    (["a", "b"], r"unexpected argument\(s\): b"),
    (["--config", "/nonexistent.yaml"], r"config file /nonexistent.yaml does not exist"),
])
def test_bad_options_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(Cfg, argv, presets=PRESETS)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.momentum'"):
        parse_args(Cfg, ["--config", str(f)])


def test_help_lists_every_field_with_its_text(capsys):
    with pytest.raises(SystemExit):
        parse_args(Cfg, ["--help"], prog="demo", presets=PRESETS)
    out = capsys.readouterr().out
    assert "--optim.lr (float, default 1e-05)" in out and "peak learning rate" in out
    assert "model (str" in out and "presets: fast" in out and "centering|abs" in out


def test_trainer_presets_carry_the_published_recipe():
    from themis_engine.config import apply
    from themis_engine.train.config import PRESETS, TrainConfig

    pt = apply(TrainConfig(), PRESETS["themis-pt"])
    pm = apply(TrainConfig(), PRESETS["themis-pm"])
    for cfg, lr, term, lam, mu, clip, batch, length, epochs in (
        (pt, 2e-5, 1e-5, 0.4, 0.01, 2.0, 1024, 2560, 2), (pm, 1e-5, 5e-7, 0.25, 0.001, 1.5, 512, 4096, 1),
    ):
        assert (cfg.optim.lr, cfg.optim.terminal_lr, cfg.objective.lm_coef, cfg.objective.magnitude_coef) == (
            lr, term, lam, mu)
        assert (cfg.optim.clip, cfg.run.global_batch_pairs, cfg.data.max_length, cfg.run.epochs) == (
            clip, batch, length, epochs)
        assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 0.1
        assert cfg.optim.warmup_fraction == 0.05 and cfg.model.dtype == "bfloat16"


# ------------------------------------------------------------------------------------------ environment
def test_every_environment_variable_read_is_in_the_one_table():
    """Each THEMIS_* name in the sources is documented in config.ENVIRONMENT (and in the README)."""
    import re
    from pathlib import Path

    from themis_engine.config import ENVIRONMENT

    root = Path(__file__).resolve().parents[1]
    names = set()
    for folder in ("themis_engine", "bench"):
        for path in (root / folder).rglob("*.py"):
            names |= set(re.findall(r"\bTHEMIS_[A-Z0-9_]+\b", path.read_text()))
    names |= set(re.findall(r"\bTHEMIS_[A-Z0-9_]+\b", (root / "setup.py").read_text()))
    assert names and names <= set(ENVIRONMENT), sorted(names - set(ENVIRONMENT))
    readme = (root / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in ENVIRONMENT), [n for n in ENVIRONMENT if f"`{n}`" not in readme]


def test_environ_checks_the_choices(monkeypatch):
    import pytest

    from themis_engine.config import ConfigError, environ

    monkeypatch.setenv("THEMIS_PLANNER", " Python ")
    assert environ("THEMIS_PLANNER") == "python"
    monkeypatch.delenv("THEMIS_PLANNER")
    assert environ("THEMIS_PLANNER") == ""
    monkeypatch.setenv("THEMIS_PLANNER", "rust")
    with pytest.raises(ConfigError, match="THEMIS_PLANNER='rust'"):
        environ("THEMIS_PLANNER")
