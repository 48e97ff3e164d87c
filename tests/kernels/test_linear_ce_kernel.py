"""The fused (chunked) linear cross-entropy against reference.linear_cross_entropy in float64.

Under no GPU the Triton part runs in the interpreter (float32 / float16); bf16 at realistic sizes
(Qwen vocabulary, V = 151936) is GPU-only.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_2x_rule, assert_close

from themis_engine.kernels import linear_ce_kernel, reference
from themis_engine.kernels.linear_ce_kernel import linear_cross_entropy


def _make(T, V, D, device, dtype=torch.float32, seed=0, ignored=0.25, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * (scale / math.sqrt(D))
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < ignored] = -100
    return hidden.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype), labels.to(device)


def _run(fn, hidden, weight, labels, ignore_index=-100, normalizer=None, upcast=False, grad_scale=1.0):
    h = hidden.detach().clone()
    w = weight.detach().clone()
    if upcast:
        h, w = h.double(), w.double()
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = fn(h, w, labels, ignore_index, normalizer)
    (loss * grad_scale).backward()
    return loss, h.grad, w.grad


@pytest.fixture
def small_chunks(monkeypatch):
    """Force chunks of at most `rows` rows (the default budget would hold these T in one chunk)."""

    def set_rows(rows, V, elem_bytes):
        monkeypatch.setattr(linear_ce_kernel, "CHUNK_BYTES", rows * V * elem_bytes)

    return set_rows


@pytest.mark.parametrize("T", [1, 17, 64])
@pytest.mark.parametrize("V", [257, 1000])
@pytest.mark.parametrize("D", [48, 100])
@pytest.mark.parametrize("chunk", [None, 8])
def test_matches_reference_fp32(device, small_chunks, T, V, D, chunk):
    if chunk is not None:
        small_chunks(chunk, V, 4)
    hidden, weight, labels = _make(T, V, D, device, seed=T * 1000 + V + D)
    if T == 1:
        labels[0] = V - 1  # the one row is labelled (the last class: edge of the last V block)
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, labels)
    ref, rdh, rdw = _run(reference.linear_cross_entropy, hidden, weight, labels, upcast=True)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(dh, rdh, 1e-5, "d hidden")
    assert_close(dw, rdw, 1e-5, "d weight")


def test_fp16_inputs(device, small_chunks):
    """fp16 logits (as the unfused model computes them): compared with the same-precision baseline."""
    small_chunks(16, 1000, 2)
    hidden, weight, labels = _make(64, 1000, 100, device, dtype=torch.float16, seed=1)
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, labels)
    ref, rdh, rdw = _run(reference.linear_cross_entropy, hidden, weight, labels, upcast=True)

    def unfused(h, w, lab, ii, norm):  # Hugging Face style: logits in fp16, the loss in float32
        return F.cross_entropy((h @ w.t()).float(), lab, ignore_index=ii)

    base, bdh, bdw = _run(unfused, hidden, weight, labels)
    for name, a, b, e in (("loss", loss, base, ref), ("d hidden", dh, bdh, rdh), ("d weight", dw, bdw, rdw)):
        assert_2x_rule(name, a, b, e, rel_floor=1e-6)  # 2x the unfused fp16 baseline's error


def test_all_ignored(device, small_chunks):
    small_chunks(5, 257, 4)
    hidden, weight, labels = _make(17, 257, 48, device)
    labels = torch.full_like(labels, -100)
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, labels)
    ref, rdh, rdw = _run(reference.linear_cross_entropy, hidden, weight, labels, upcast=True)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert (dh == 0).all() and (dw == 0).all()
    assert_close(loss, ref, 1e-5)


def test_other_ignore_index_and_upstream_grad(device):
    hidden, weight, labels = _make(17, 257, 48, device, seed=3, ignored=0.0)
    labels[::4] = 7  # class 7 is the ignored one here
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, labels, ignore_index=7, grad_scale=2.5)
    ref, rdh, rdw = _run(reference.linear_cross_entropy, hidden, weight, labels, 7, upcast=True, grad_scale=2.5)
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(dh, rdh, 1e-5, "d hidden")
    assert_close(dw, rdw, 1e-5, "d weight")


def test_micro_batches_with_global_normalizer(device, small_chunks):
    small_chunks(8, 1000, 4)
    hidden, weight, labels = _make(64, 1000, 100, device, seed=4)
    total = float((labels != -100).sum())
    whole, dh, dw = _run(linear_cross_entropy, hidden, weight, labels)
    cut = 23
    l1, dh1, dw1 = _run(linear_cross_entropy, hidden[:cut], weight, labels[:cut], normalizer=total)
    l2, dh2, dw2 = _run(linear_cross_entropy, hidden[cut:], weight, labels[cut:], normalizer=total)
    assert_close(l1 + l2, whole, 1e-6, "loss")
    assert_close(torch.cat([dh1, dh2]), dh, 1e-6, "d hidden")
    assert_close(dw1 + dw2, dw, 1e-6, "d weight")
    ref, rdh, rdw = _run(reference.linear_cross_entropy, hidden[:cut], weight, labels[:cut], -100, total, True)
    assert_close(l1, ref, 1e-5, "loss")
    assert_close(dh1, rdh, 1e-5, "d hidden")
    assert_close(dw1, rdw, 1e-5, "d weight")


def test_large_logits_stable(device):
    """Logits of a few thousand: the online logsumexp must not overflow."""
    hidden, weight, labels = _make(17, 257, 48, device, seed=5, scale=400.0)
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, labels)
    ref, rdh, rdw = _run(reference.linear_cross_entropy, hidden, weight, labels, upcast=True)
    assert ref.item() > 100
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(dh, rdh, 1e-5, "d hidden")
    assert_close(dw, rdw, 1e-5, "d weight")


def test_frozen_weight_and_no_grad(device):
    hidden, weight, labels = _make(17, 257, 48, device, seed=6)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels).backward()
    _, rdh, _ = _run(reference.linear_cross_entropy, hidden, weight, labels, upcast=True)
    assert_close(h.grad, rdh, 1e-5, "d hidden")
    with torch.no_grad():
        loss = linear_cross_entropy(h, weight, labels)
    assert not loss.requires_grad
    assert_close(loss, reference.linear_cross_entropy(hidden.double(), weight.double(), labels), 1e-5)


def test_custom_op_checks(device):
    hidden, weight, labels = _make(17, 257, 48, device, seed=7)
    for need_dh, need_dw in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(
            torch.ops.themis.linear_ce_fwd.default, (hidden, weight, labels, -100, None, need_dh, need_dw, 5)
        )


def test_torch_compile_traces(device):
    hidden, weight, labels = _make(17, 257, 48, device, seed=8)
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    loss, dh, dw = _run(lambda h, w, lab, ii, n: compiled(h, w, lab, ii, n), hidden, weight, labels)
    ref, rdh, rdw = _run(reference.linear_cross_entropy, hidden, weight, labels, upcast=True)
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(dh, rdh, 1e-5, "d hidden")
    assert_close(dw, rdw, 1e-5, "d weight")


# --------------------------------------------------------------------------------------------
# GPU only: realistic sizes in bf16 (Qwen2/3 vocabulary)
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("D", [1024, 4096])
def test_gpu_realistic_bf16(D):
    """err(kernel vs float64) <= 2 * err(unfused bf16 logits + float32 CE vs float64)."""
    device = torch.device("cuda")
    T, V = 4096, 151936
    hidden, weight, labels = _make(T, V, D, device, dtype=torch.bfloat16, seed=D, ignored=0.1)
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, labels)
    torch.cuda.synchronize()

    def unfused(h, w, lab, ii, norm):
        return F.cross_entropy((h @ w.t()).float(), lab, ignore_index=ii)

    base, bdh, bdw = _run(unfused, hidden, weight, labels)
    ref, rdh, rdw = _run(reference.linear_cross_entropy, hidden, weight, labels, upcast=True)
    for name, a, b, e in (("loss", loss, base, ref), ("d hidden", dh, bdh, rdh), ("d weight", dw, bdw, rdw)):
        assert_2x_rule(name, a, b, e, rel_floor=1e-5)  # 2x the unfused bf16 baseline's error


@pytest.mark.gpu
def test_gpu_fp32_medium():
    device = torch.device("cuda")
    hidden, weight, labels = _make(1024, 32000, 1024, device, seed=9)
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, labels)
    ref, rdh, rdw = _run(reference.linear_cross_entropy, hidden, weight, labels, upcast=True)
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(dh, rdh, 1e-5, "d hidden")
    assert_close(dw, rdw, 1e-5, "d weight")


def test_out_of_range_label_is_an_error_naming_the_row():
    from themis_engine.kernels.linear_ce_kernel import linear_cross_entropy as flce

    hidden = torch.randn(4, 8)
    weight = torch.randn(10, 8)
    labels = torch.tensor([1, -100, 10, 3])
    with pytest.raises(ValueError, match=r"label 10 at row 2 is outside \[0, 10\)"):
        flce(hidden, weight, labels)
