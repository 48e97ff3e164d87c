"""The synthetic CRB-like workload and the throughput script's CPU smoke mode (scoring, FP8, and
training through the trainer's own step)."""

from __future__ import annotations

import json
import statistics

import pytest
from bench_scripts import load

from themis_engine.data.workload import crb_like_pairs
from themis_engine.packing.planner import shared_prefix_len
from themis_engine.train.trainer import Trainer


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


def test_throughput_cpu_smoke_mode(capsys, tmp_path):
    out_json = tmp_path / "score.json"
    rows = load("throughput").main(["--cpu", "--pairs", "4", "--repeats", "2", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "| themis_engine |" in out and "| transformers |" in out and "token ratio" in out
    assert out.lstrip().startswith("scoring throughput | card: cpu | torch ")  # the harness's header
    assert "command: python bench/throughput.py --cpu --pairs 4 --repeats 2" in out
    assert rows["max_abs_diff"] < 1e-4 and rows["preference_agreement"] == 1.0
    assert rows["token_ratio"] > 1.0
    assert len(rows["engine_times"]) == len(rows["hf_times"]) == 2  # --repeats timed runs each, their median
    assert rows["engine_s"] == statistics.median(rows["engine_times"])
    assert rows["hf_s"] == statistics.median(rows["hf_times"])
    data = json.loads(out_json.read_text())
    assert data["env"]["card"] == "cpu" and data["engine_peak_gib"] is None  # NaN written as null
    assert data["unique_tokens"] == rows["unique_tokens"]
    # from text (on by default): both sides timed, the same scores, the engine computing fewer tokens
    text = rows["text"]
    assert "| themis_engine, from text |" in out and "| transformers, from text |" in out
    assert text["max_abs_diff"] < 1e-4 and text["preference_agreement"] == 1.0
    assert len(text["engine_times"]) == len(text["hf_times"]) == 2 and text["truncated"] == 0
    assert 0 < text["computed_tokens"] < text["standalone_tokens"]
    assert data["text"]["speedup"] == pytest.approx(text["hf_s"] / text["engine_s"])


def test_throughput_cpu_fp8_row(capsys):
    rows = load("throughput").main(["--cpu", "--pairs", "4", "--repeats", "1", "--skip-baseline", "--fp8",
                                    "--max-tokens-per-batch", "auto", "--text", "false"])
    out = capsys.readouterr().out
    assert "| themis_engine fp8 (dequantize) |" in out and "fp8 / bf16 engine:" in out
    f = rows["fp8"]
    assert "text" not in rows and "from text" not in out
    assert f["tokens_per_s"] > 0 and f["score_correlation"] > 0.99 and f["preference_agreement"] >= 0.75
    with pytest.raises(SystemExit):  # the config check refuses a budget that is not positive
        load("throughput").parse_args(["--max-tokens-per-batch", "0"])


def test_the_engine_side_is_the_trainers_step():
    """BenchTrainer only supplies data, batches and a fixed LR: the step and forward_backward are Trainer's."""
    tp = load("throughput")
    assert issubclass(tp.BenchTrainer, Trainer)
    for name in ("train_step", "forward_backward", "_clip", "_step_metrics"):
        assert name not in vars(tp.BenchTrainer), name
    assert set(vars(tp.BenchTrainer)) & {"global_batch", "lr_at"} == {"global_batch", "lr_at"}


def test_throughput_cpu_train_mode_agrees_with_transformers(capsys, monkeypatch):
    """--mode train --cpu: both sides train; at the shared first step (same weights, same batch,
    float32) the engine's BT + magnitude + LM losses and gradient norm equal transformers'. The
    engine's steps run through Trainer.train_step and Trainer.forward_backward (counted here)."""
    calls = {"train_step": 0, "forward_backward": 0}
    for name in calls:
        original = getattr(Trainer, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            calls[_name] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(Trainer, name, counted)
    rows = load("throughput").main(["--cpu", "--mode", "train", "--steps", "1", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "training throughput" in out and "| themis_engine |" in out and "| transformers |" in out
    assert "first step" in out and "token ratio" in out
    assert "engine step: themis_engine.train.trainer.Trainer.train_step" in out
    assert rows["first_step_max_rel_diff"] < 1e-4
    assert rows["check_rel_diff"]["grad_norm"] < 1e-4
    assert all(v > 0 for v in rows["engine_check"][:4])  # every term is there (BT, magnitude, LM)
    assert rows["token_ratio"] > 1.0 and rows["engine_pairs_per_s"] > 0 and rows["hf_pairs_per_s"] > 0
    # the check step, one more warm-up step, then --repeats x --steps timed steps
    assert calls["train_step"] == 2 + 2 * rows["steps"]
    timed = 2 * rows["engine_micro_batches"]  # --repeats x the micro-batches of the timed steps
    warm = calls["forward_backward"] - timed  # the check step's and the warm-up step's (the same batch)
    assert warm > 0 and warm % 2 == 0
    assert len(rows["engine_times"]) == 2 and len(rows["engine_step_losses"]) == rows["steps"]


def test_throughput_cpu_train_mode_untied_lm_head():
    """The untied LM head (as qwen3-8b) is shared by both sides too, and the steps still agree."""
    rows = load("throughput").main(["--cpu", "--mode", "train", "--steps", "1", "--tie", "no", "--optimizer", "sgd"])
    assert not rows["tied"] and rows["optimizer"] == "sgd"
    assert rows["first_step_max_rel_diff"] < 1e-4 and rows["check_rel_diff"]["grad_norm"] < 1e-4
