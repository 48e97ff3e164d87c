"""The shared host-side glue of kernels/_utils.py: the per-program weight-gradient partials of the
persistent backward kernels (rms_norm, qk_norm_rope) and the empty tensor an op returns for a
gradient nobody asked for (its fakes included)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from themis_engine.kernels._utils import empty_unless, persistent_programs, weight_grad, weight_grad_partials


@pytest.mark.parametrize("n_tiles", [0, 1, 2, 7])
@pytest.mark.parametrize("compute_dw", [True, False])
def test_weight_grad_partials_sizes(n_tiles, compute_dw):
    x = torch.zeros(3, 5)
    n_programs, partial = weight_grad_partials(x, n_tiles, 24, compute_dw)
    # no tile: nothing to launch (persistent_programs alone would say 1)
    assert n_programs == (persistent_programs(x, n_tiles) if n_tiles else 0)
    assert n_programs <= n_tiles
    assert partial.shape == ((n_programs if compute_dw else 0), 24)
    assert partial.dtype == torch.float32 and partial.device == x.device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_grad_sums_the_partials_in_the_weight_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    partial = torch.randn(3, 10, generator=g)
    weight = torch.ones(10, dtype=dtype)
    dw = weight_grad(partial, weight, True)
    assert dw.dtype == dtype and dw.shape == (10,)
    assert torch.equal(dw, partial.sum(0).to(dtype))
    # no partial rows (no tile was launched): a zero gradient, not an empty one
    assert torch.equal(weight_grad(partial[:0], weight, True), torch.zeros(10, dtype=dtype))
    none = weight_grad(partial[:0], weight, False)
    assert none.shape == (0,) and none.dtype == dtype


def test_empty_unless_follows_its_input():
    like = torch.zeros(4, 6, dtype=torch.float16)[:, ::2]  # a strided view
    full = empty_unless(True, like)
    assert full.shape == like.shape and full.dtype == like.dtype and full.stride() == torch.empty_like(like).stride()
    empty = empty_unless(False, like)
    assert empty.shape == (0,) and empty.dtype == like.dtype and empty.device == like.device


@pytest.mark.parametrize("need_dh,need_dw", [(True, True), (True, False), (False, True), (False, False)])
def test_fakes_match_the_launchers(need_dh, need_dw):
    """The bt_loss and linear_ce fakes, written with empty_unless, give the shapes and dtypes the
    launchers give."""
    from themis_engine.kernels import bt_loss_kernel, linear_ce_kernel  # noqa: F401  (registers the ops)

    ops = torch.ops.themis
    g = torch.Generator().manual_seed(1)
    N, D, H, V = 5, 16, 3, 11
    hc, hr = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    w, gc, gr = torch.randn(H, D, generator=g), torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    scale = torch.tensor(0.5)
    wv, labels = torch.randn(V, D, generator=g), torch.randint(0, V, (N,), generator=g)
    calls = [
        (ops.bt_loss_bwd.default, (hc, hr, w, gc, gr, scale, need_dh, need_dw)),
        (ops.linear_ce_fwd.default, (hc, wv, labels, -100, None, need_dh, need_dw, 2)),
    ]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in args]
            fake = op(*fake_args)
        for r, f in zip(real, fake):
            assert (tuple(f.shape), f.dtype) == (tuple(r.shape), r.dtype), op
