"""The public names users and other programs rely on (ARCHITECTURE section 4), and the module
paths of the earlier flat layout, which still import as aliases of their new homes."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import themis_engine as te
from themis_engine import _compat

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_section_4_names():
    for name in ("RewardModel", "Scorer", "ModelArgs", "DEFAULT_CRITERIA", "ScoreReport", "PackedBatch",
                 "SegmentMeta", "InputError", "PackingError", "CheckpointError", "DataError", "ConfigError"):
        assert hasattr(te, name), name
    assert callable(te.RewardModel.from_pretrained) and callable(te.RewardModel.save_pretrained)
    for method in ("from_pretrained", "score", "score_pairs", "score_groups", "score_token_groups",
                   "as_trl_reward_funcs", "tokenize"):
        assert callable(getattr(te.Scorer, method)), method
    assert isinstance(te.RewardModel.__dict__.get("criteria"), property)
    # every error users catch derives from one base and from the builtin it always was
    assert issubclass(te.InputError, te.ThemisError) and issubclass(te.InputError, ValueError)
    assert issubclass(te.TrainingError, RuntimeError)


@pytest.mark.parametrize("old, new", sorted(_compat.OLD_PATHS.items()))
def test_old_module_paths_alias_the_new_modules(old, new):
    assert importlib.import_module(f"themis_engine.{old}") is importlib.import_module(f"themis_engine.{new}")


def test_old_config_names():
    import themis_engine.config as config
    from themis_engine.model import args

    assert config.ModelArgs is args.ModelArgs and config.NAMED_SHAPES is args.NAMED_SHAPES
    with pytest.raises(AttributeError):
        config.NoSuchName  # noqa: B018


@pytest.mark.parametrize("module", ["themis_engine.train", "themis_engine.eval", "themis_engine.serve",
                                    "themis_engine.scoring.demo", "themis_engine.demo"])
def test_entry_points_answer_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "--" in out.stdout
