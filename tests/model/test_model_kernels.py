"""The whole model with the Triton kernels (the interpreter on CPU, the GPU where there is one)
gives the scores of the reference path, on a packed prefix-shared batch."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import make_checkpoint, random_text

import themis_engine as te
from themis_engine import kernels


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_kernels")
    ckpt = make_checkpoint(root, "m", family="qwen3", num_labels=3, num_heads=4, num_kv_heads=2,
                           head_dim=16, hidden_size=32, num_layers=2)
    return te.Scorer.from_pretrained(ckpt, device="cpu", dtype=torch.float32)


def _pairs(n=3, seed=0):
    rng = random.Random(seed)
    return ([random_text(rng, 2, 6) for _ in range(n)], [random_text(rng, 1, 5) for _ in range(n)],
            [random_text(rng, 1, 5) for _ in range(n)])


def test_every_op_has_a_triton_kernel():
    for op in kernels.KERNEL_MODULES:
        assert kernels._kernel(op) is not None, op


def test_model_with_triton_kernels_matches_reference(scorer, monkeypatch):
    prompts, chosen, rejected = _pairs()
    monkeypatch.setenv("THEMIS_KERNELS", "reference")
    ref_c, ref_r = scorer.score_pairs(prompts, chosen, rejected)
    monkeypatch.setenv("THEMIS_KERNELS", "triton")
    assert kernels.backend_for("attention", scorer.model.score.weight) == "triton"
    c, r = scorer.score_pairs(prompts, chosen, rejected)
    torch.testing.assert_close(c, ref_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r, ref_r, rtol=1e-4, atol=1e-4)
