"""The synthetic CRB-like workload and the throughput script's CPU smoke mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from themis_engine.packing.planner import shared_prefix_len
from themis_engine.data.workload import crb_like_pairs

ROOT = Path(__file__).resolve().parents[2]


def test_workload_is_seeded_and_within_max_length():
    a = crb_like_pairs(40, 5000, max_length=1024, seed=3)
    b = crb_like_pairs(40, 5000, max_length=1024, seed=3)
    assert a.prefix_ids == b.prefix_ids and a.chosen_ids == b.chosen_ids
    assert max(len(s) for s in a.sequences()) <= 1024
    assert all(10 <= t < 5000 or t in (1, 2) for s in a.sequences() for t in s)
    assert set(a.aspects) <= {"Functional_Correctness", "Readability_Maintainability", "Runtime_Efficiency",
                              "Security_Hardness", "Memory_Efficiency"}
    # commit-style pairs share more than their prompt
    for p, c, r, commit in zip(a.prefix_ids, a.chosen_ids, a.rejected_ids, a.commit_style):
        shared = shared_prefix_len([p + c, p + r])
        assert shared >= len(p)
        if commit:
            assert shared > len(p)
    assert a.padded_tokens(8) >= a.standalone_tokens() > a.unique_tokens()


def test_throughput_cpu_smoke_mode(capsys):
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--cpu", "--pairs", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| themis_engine |" in out and "| transformers |" in out and "token ratio" in out
    assert rows["max_abs_diff"] < 1e-4 and rows["preference_agreement"] == 1.0
    assert rows["token_ratio"] > 1.0


def test_throughput_cpu_fp8_row(capsys):
    rows = _load_throughput().main(["--cpu", "--pairs", "4", "--repeats", "1", "--skip-baseline", "--fp8",
                                    "--max-tokens-per-batch", "auto"])
    out = capsys.readouterr().out
    assert "| themis_engine fp8 (dequantize) |" in out and "fp8 / bf16 engine:" in out
    f = rows["fp8"]
    assert f["tokens_per_s"] > 0 and f["score_correlation"] > 0.99 and f["preference_agreement"] >= 0.75
    with pytest.raises(SystemExit):  # argparse refuses a budget that is not positive
        _load_throughput().parse_args(["--max-tokens-per-batch", "0"])


def _load_throughput():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_cpu_train_mode_agrees_with_transformers(capsys):
    """--mode train --cpu: both sides train; at the shared first step (same weights, same batch,
    float32) the engine's BT + magnitude + LM losses and gradient norm equal transformers'."""
    mod = _load_throughput()
    rows = mod.main(["--cpu", "--mode", "train", "--steps", "1"])
    out = capsys.readouterr().out
    assert "training throughput" in out and "| themis_engine |" in out and "| transformers |" in out
    assert "first step" in out and "token ratio" in out
    assert rows["first_step_max_rel_diff"] < 1e-4
    assert rows["check_rel_diff"]["grad_norm"] < 1e-4
    assert all(v > 0 for v in rows["engine_check"][:4])  # every term is there (BT, magnitude, LM)
    assert rows["token_ratio"] > 1.0 and rows["engine_pairs_per_s"] > 0 and rows["hf_pairs_per_s"] > 0


def test_throughput_cpu_train_mode_untied_lm_head():
    """The untied LM head (as qwen3-8b) is shared by both sides too, and the steps still agree."""
    mod = _load_throughput()
    rows = mod.main(["--cpu", "--mode", "train", "--steps", "1", "--tie", "no", "--optimizer", "sgd"])
    assert not rows["tied"] and rows["optimizer"] == "sgd"
    assert rows["first_step_max_rel_diff"] < 1e-4 and rows["check_rel_diff"]["grad_norm"] < 1e-4
