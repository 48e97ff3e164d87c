"""Token budgets from device memory (scoring/budget.py), the scorer's use of them, and the one-copy transfer
of a packed batch to the device."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
import torch
from helpers import make_checkpoint

import themis_engine as te
from themis_engine import packing
from themis_engine.packing import batch as packed_batch
from themis_engine.scoring import budget


def test_budget_arithmetic():
    # 0.85 * 10 GiB / 100 KiB = 89128.96 tokens -> 89088 (a multiple of 1024)
    assert budget.budget_from(100 * 1024, 10 * 2**30) == 89088
    assert budget.budget_from(100 * 1024, 10 * 2**30, fraction=0.5) == 52224
    assert budget.budget_from(1024, 80 * 2**30) == budget.DEFAULT_CAP
    assert budget.budget_from(1024, 80 * 2**30, cap=4096) == 4096
    assert budget.budget_from(1000, 1024 * 1000 / 0.85 + 1) == 1024


def test_budget_too_small_names_the_numbers():
    with pytest.raises(budget.MemoryBudgetError, match=r"0\.00 GiB of device memory left; at 100\.0 KiB"):
        budget.budget_from(100 * 1024, 1000)
    with pytest.raises(ValueError, match="bytes_per_token must be positive"):
        budget.budget_from(0, 2**30)
    with pytest.raises(ValueError, match="fraction"):
        budget.budget_from(1, 2**30, fraction=1.5)


@pytest.mark.parametrize("tokens,segment", [(8192, 2048), (5000, 2048), (7, 10), (1, 1)])
def test_probe_batch_layout(tokens, segment):
    b = budget.probe_batch(1000, tokens, segment)
    assert b.num_tokens == tokens
    lengths = np.diff(b.cu_seqlens)
    assert lengths.max() == min(segment, tokens) and lengths.sum() == tokens
    assert (b.prefix_len == 0).all()  # unshared segments: nothing is computed once for several
    assert len(b.score_index) == len(lengths)
    assert b.input_ids.min() >= 0 and b.input_ids.max() < 1000


def test_probe_batch_runs_through_a_model(tmp_path):
    rm = te.RewardModel.from_pretrained(make_checkpoint(tmp_path, "m", family="qwen3", num_labels=2),
                                        dtype=torch.float32)
    b = budget.probe_batch(rm.args.vocab_size, 300, 128)
    with torch.inference_mode():
        out = rm(**b.to_torch("cpu"))
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_auto_budget_refuses_a_cpu_model(tmp_path):
    rm = te.RewardModel.from_pretrained(make_checkpoint(tmp_path, "m", family="qwen3", num_labels=1))
    with pytest.raises(ValueError, match="measures CUDA memory; the model is on cpu"):
        budget.auto_token_budget(rm)


class _FakeCudaModel(torch.nn.Module):
    """Only what Scorer._budget looks at: a CUDA device."""

    device = torch.device("cuda")

    def eval(self):
        return self


def test_scorer_measures_the_budget_once_on_cuda_and_raises_it_for_a_big_group(monkeypatch, caplog):
    calls = []

    def fake(model):
        calls.append(model)
        return budget.TokenBudget(tokens=4096, bytes_per_token=1.0, available_bytes=1, probe_tokens=8192)

    monkeypatch.setattr(budget, "auto_token_budget", fake)
    scorer = te.Scorer(_FakeCudaModel(), tokenizer=None)
    small = (np.array([0, 100, 250]), np.array([0, 2]))  # one group of 250 tokens
    assert scorer._budget(*small) == 4096
    assert scorer._budget(*small) == 4096
    assert len(calls) == 1 and scorer.auto_budget.tokens == 4096
    big = (np.array([0, 3000, 6000]), np.array([0, 2]))  # one group of 6000 tokens
    with caplog.at_level(logging.WARNING, logger="themis_engine"):
        assert scorer._budget(*big) == 6000
    assert "a group of 6000 tokens is over the automatic token budget of 4096" in caplog.text
    # an explicit budget is never measured nor raised
    explicit = te.Scorer(_FakeCudaModel(), tokenizer=None, max_tokens_per_batch=512)
    assert explicit._budget(*big) == 512 and len(calls) == 1


def test_cpu_default_budget_is_unchanged():
    cpu_model = types.SimpleNamespace(device=torch.device("cpu"), eval=lambda: cpu_model)
    scorer = te.Scorer(cpu_model, tokenizer=None)
    assert scorer._budget(np.array([0, 10, 30]), np.array([0, 2])) == 16384
    assert scorer._budget(np.array([0, 10000, 30000]), np.array([0, 2])) == 30000


def test_batch_to_torch_one_copy_per_dtype_keeps_every_field():
    groups = [[[5, 6, 7, 8], [5, 6, 9]], [[1, 2, 3]], [[4]]]
    (b,) = packing.plan(*packing.flatten_groups(groups), 64)
    t = b.to_torch("cpu", with_seq_ids=True)
    for name in ("input_ids", "position_ids", "score_index", "seq_ids"):
        assert t[name].dtype == torch.int64 and t[name].tolist() == getattr(b, name).tolist(), name
    for name in ("cu_seqlens", "prefix_start", "prefix_len"):
        got = getattr(t["meta"], name)
        assert got.dtype == torch.int32 and got.tolist() == getattr(b, name).tolist(), name
    assert t["meta"].max_seqlen == b.max_seqlen
    assert "seq_ids" not in b.to_torch("cpu")
    # the helper the CUDA path uses, run on the CPU: views of one buffer, values and dtypes kept
    wide = packed_batch._to_device_in_one_copy([b.input_ids, b.score_index], torch.int64, "cpu")
    narrow = packed_batch._to_device_in_one_copy([b.cu_seqlens, b.prefix_len], torch.int32, "cpu")
    assert wide[0].tolist() == b.input_ids.tolist() and wide[1].tolist() == b.score_index.tolist()
    assert narrow[0].dtype == torch.int32 and narrow[1].tolist() == b.prefix_len.tolist()
    assert wide[1].untyped_storage().data_ptr() == wide[0].untyped_storage().data_ptr()


@pytest.mark.gpu
def test_gpu_auto_budget_scores_without_running_out(tmp_path):
    ckpt = make_checkpoint(tmp_path, "m", family="qwen3", num_labels=3)
    scorer = te.Scorer.from_pretrained(ckpt, device="cuda", dtype=torch.bfloat16)
    ref = te.Scorer.from_pretrained(ckpt, device="cuda", dtype=torch.bfloat16, max_tokens_per_batch=300)
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 500, 40).tolist() for _ in range(6)]
    suffixes = [[rng.integers(0, 500, int(n)).tolist() for n in rng.integers(1, 60, 3)] for _ in range(6)]
    got = torch.cat(scorer.score_token_groups(prefixes, suffixes))
    budget = scorer.auto_budget
    assert budget is not None and budget.tokens % budget.GRANULE == 0
    assert budget.GRANULE <= budget.tokens <= budget.DEFAULT_CAP and budget.bytes_per_token > 0
    # several micro-batches (budget 300) or one (auto): the same scores, up to bf16 rounding
    torch.testing.assert_close(got, torch.cat(ref.score_token_groups(prefixes, suffixes)), atol=2e-2, rtol=2e-2)
