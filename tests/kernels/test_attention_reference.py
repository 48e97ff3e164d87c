"""The attention reference (the oracle of the kernels) against an independent computation:
each segment's output equals causal attention over its standalone sequence (prefix + segment)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from themis_engine.kernels import reference
from themis_engine.packing.planner import flatten_groups, plan


def _random_stream(seed, groups=4, hq=4, hkv=2, d=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(groups):
        k = int(torch.randint(1, 6, (1,), generator=g))
        prompt = torch.randint(0, 9, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
        seqs.append([prompt + torch.randint(0, 9, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
                     for _ in range(k)])
    (batch,) = plan(*flatten_groups(seqs), budget=10_000)
    T = batch.num_tokens
    q = torch.randn(T, hq, d, generator=g, dtype=dtype)
    k = torch.randn(T, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(T, hkv, d, generator=g, dtype=dtype)
    meta = [torch.from_numpy(x) for x in (batch.cu_seqlens, batch.prefix_start, batch.prefix_len)]
    return batch, q, k, v, meta


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (8, 2)])
def test_reference_equals_standalone_causal(seed, hq, hkv):
    batch, q, k, v, (cu, ps, pl) = _random_stream(seed, hq=hq, hkv=hkv)
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = reference.attention(q, k, v, cu, ps, pl, batch.max_seqlen, scale)
    for s in range(len(pl)):
        a, b = int(cu[s]), int(cu[s + 1])
        rows = torch.cat([torch.arange(int(ps[s]), int(ps[s]) + int(pl[s])), torch.arange(a, b)])
        qs = q[rows].transpose(0, 1)
        ks = k[rows].repeat_interleave(hq // hkv, 1).transpose(0, 1)
        vs = v[rows].repeat_interleave(hq // hkv, 1).transpose(0, 1)
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
        n = b - a
        torch.testing.assert_close(out[a:b], want[-n:], rtol=1e-12, atol=1e-12)
        scores = (qs @ ks.transpose(1, 2)) * scale
        mask = torch.ones(len(rows), len(rows), dtype=torch.bool).tril()
        want_lse = scores.masked_fill(~mask, -math.inf).logsumexp(-1)[:, -n:]
        torch.testing.assert_close(lse[:, a:b].double(), want_lse, rtol=1e-6, atol=1e-6)


def test_reference_mask_by_hand():
    """Stream [P P | S1 S1 | S2]: S1 sees P and itself causally; S2 sees P, never S1."""
    T, d = 5, 4
    q = torch.zeros(T, 1, d, dtype=torch.float64)  # equal scores: output = mean of visible values
    k = torch.zeros(T, 1, d, dtype=torch.float64)
    v = torch.arange(T, dtype=torch.float64)[:, None, None].expand(T, 1, d).clone()
    cu = torch.tensor([0, 2, 4, 5], dtype=torch.int32)
    ps = torch.tensor([0, 0, 0], dtype=torch.int32)
    pl = torch.tensor([0, 2, 2], dtype=torch.int32)
    out, _ = reference.attention(q, k, v, cu, ps, pl, 2, 1.0)
    want = torch.tensor([0.0, 0.5, (0 + 1 + 2) / 3, (0 + 1 + 2 + 3) / 4, (0 + 1 + 4) / 3], dtype=torch.float64)
    torch.testing.assert_close(out[:, 0, 0], want, rtol=0, atol=1e-12)


def test_reference_rejects_bad_gqa():
    q = torch.zeros(3, 3, 4)
    k = torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match="3 query heads is not a multiple of 2 kv heads"):
        reference.attention(q, k, k, torch.tensor([0, 3]), torch.tensor([0]), torch.tensor([0]), 3, 1.0)
