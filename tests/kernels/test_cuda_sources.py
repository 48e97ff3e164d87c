"""The CUDA extension backend (csrc/cuda, kernels/cuda_ext.py): the sources compile with plain nvcc
(where nvcc is installed); the dispatch picks the backend only under THEMIS_KERNELS=cuda, for
bfloat16 CUDA tensors in inference (CPU: the decision itself); the ops' references are the engine's
own path (CPU); and on a GPU (marked) each kernel matches its reference on awkward shapes and its
custom op traces."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_2x_rule, eps_floor

from themis_engine import kernels
from themis_engine.kernels import reference

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc" / "cuda"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_with_nvcc():
    res = subprocess.run(["bash", str(CSRC / "compile_check.sh")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("score_head.cu", "add_rmsnorm.cu"):
        assert f"ok      {name}" in res.stdout


def test_cuda_sources_have_no_torch_headers():
    for cu in CSRC.glob("*.cu*"):
        text = cu.read_text()
        for banned in ("torch/", "ATen/", "c10/", "pybind11"):
            assert banned not in text, f"{cu.name} includes {banned}: .cu files take raw pointers only"
    assert sorted(p.name for p in CSRC.glob("*.cu")) == ["add_rmsnorm.cu", "score_head.cu"]


def test_package_import_does_not_load_the_extension():
    code = ("import sys, themis_engine, themis_engine.model.fp8, themis_engine.model.offload; "
            "print('themis_engine.kernels.cuda_ext' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------ the dispatch (CPU)
def _cuda_like(dtype=torch.bfloat16):
    """What backend_for reads of a tensor (is_cuda, dtype), for a CUDA tensor on a machine without one."""
    return SimpleNamespace(is_cuda=True, dtype=dtype)


def test_cuda_backend_only_on_explicit_request_for_bf16_inference(themis_kernels):
    x = _cuda_like()
    for requested in ("auto", "triton", "reference"):
        themis_kernels(requested)
        with torch.no_grad():
            assert kernels.backend_for("score_head", x) != "cuda", requested
            assert kernels.backend_for("add_rms_norm", x) != "cuda", requested
    themis_kernels("cuda")
    with torch.no_grad():
        assert kernels.backend_for("score_head", x) == "cuda"
        assert kernels.backend_for("add_rms_norm", x) == "cuda"
        assert kernels.backend_for("rms_norm", x) == "triton"  # no residual: not a CUDA-extension op
        assert kernels.backend_for("attention", x) == "triton"  # the rest as under auto
        assert kernels.backend_for("bt_loss", x) == "reference"
        assert kernels.backend_for("score_head", _cuda_like(torch.float16)) == "triton"
        assert kernels.backend_for("score_head", torch.zeros(2, 4, dtype=torch.bfloat16)) == "reference"  # CPU
        from themis_engine.kernels import cuda_ext

        assert kernels.implementation("score_head", x) is cuda_ext.score_head
        assert kernels.implementation("add_rms_norm", x) is cuda_ext.add_rms_norm
    # grad mode on: the extension has no backward, the Triton kernels serve
    assert kernels.backend_for("score_head", x) == "triton"
    assert kernels.backend_for("add_rms_norm", x) == "triton"


def test_themis_kernels_is_validated(themis_kernels):
    themis_kernels("cudnn")
    with pytest.raises(ValueError, match="THEMIS_KERNELS='cudnn': must be one of"):
        kernels.backend_for("rms_norm", torch.zeros(2))
    themis_kernels("auto")
    with pytest.raises(ValueError, match="unknown op"):
        kernels.backend_for("layer_norm", torch.zeros(2))


# ------------------------------------------------------------------ reference math (CPU)
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("T,D,N,H", [(17, 64, 5, 5), (40, 59, 1, 3), (9, 128, 9, 1)])
def test_score_head_is_the_engine_path(themis_kernels, backend, T, D, N, H):
    """kernels.score_head is exactly what RewardModel.forward computes after the blocks,
    score(norm(h[score_index])) = F.linear(kernels.rms_norm(h[score_index]), score.weight), bit for
    bit, on either backend; and reference.score_head is that composition of the references."""
    themis_kernels(backend)
    g = torch.Generator().manual_seed(T * D)
    hidden = torch.randn(T, D, generator=g) * 3
    idx = torch.randint(0, T, (N,), generator=g)
    w = 1 + 0.2 * torch.randn(D, generator=g)
    head = torch.randn(H, D, generator=g) * D**-0.5
    eps = 1e-6
    engine = F.linear(kernels.rms_norm(hidden[idx], w, eps), head)
    assert kernels.backend_for("score_head", hidden) == backend
    assert torch.equal(kernels.score_head(hidden, idx, w, head, eps), engine)
    assert torch.equal(reference.score_head(hidden, idx, w, head, eps),
                       F.linear(reference.rms_norm(hidden[idx], w, eps), head))


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 59), (1, 4096)])
def test_add_rms_norm_reference_rounding_order(shape):
    """h = x + r rounded to bf16; y = bf16(w * bf16(h * rstd)) with rstd in float32 of the rounded h:
    the contract the add_rmsnorm kernel implements."""
    g = torch.Generator().manual_seed(shape[-1])
    x, r = (torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2))
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(torch.bfloat16)
    y, h = reference.rms_norm(x, w, 1e-6, r)
    assert h.dtype == y.dtype == torch.bfloat16
    assert torch.equal(h, (x.float() + r.float()).to(torch.bfloat16))
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(y, (w.float() * normed.float()).to(torch.bfloat16))


# ------------------------------------------------------------------ the kernels (GPU)
@pytest.fixture(scope="module")
def ops():
    from themis_engine.kernels import cuda_ext

    return cuda_ext.load()


def _raw_score_head_reference(hidden, idx, w, head, eps):
    """The raw kernel's contract, float32 [N, H]: reference.rms_norm at the score rows in hidden's
    dtype, then the head's dot products in float32, not rounded to bf16 (the op rounds them)."""
    return reference.rms_norm(hidden[idx], w, eps).float() @ head.float().T


def _ideal_score_head(hidden, idx, w, head, eps):
    """float64, no intermediate rounding: the value both bf16 computations approximate."""
    x = hidden[idx].double()
    z = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return z @ head.double().T


@pytest.mark.gpu
@pytest.mark.parametrize("T,D,N,H", [
    (1, 8, 1, 1), (300, 1024, 7, 5), (4097, 5120, 64, 5), (50, 4096, 3, 9), (33, 59, 4, 2), (20, 1000, 5, 5),
    (8, 32768, 2, 3), (10, 2048, 0, 5),
])
def test_gpu_score_head_matches_reference(ops, T, D, N, H):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(T + D)
    hidden = (torch.randn(T, D, device=dev, generator=g) * 2).to(torch.bfloat16)
    idx = torch.randint(0, T, (N,), device=dev, generator=g)
    w = (1 + 0.2 * torch.randn(D, device=dev, generator=g)).to(torch.bfloat16)
    head = (torch.randn(H, D, device=dev, generator=g) * D**-0.5).to(torch.bfloat16)
    out = ops.score_head(hidden, idx, w, head, 1e-6)
    assert out.shape == (N, H) and out.dtype == torch.float32
    if N == 0:
        return
    ref = _raw_score_head_reference(hidden, idx, w, head, 1e-6)
    ideal = _ideal_score_head(hidden, idx, w, head, 1e-6)
    # the kernel's error vs the ideal is at most ~2x the bf16 reference's own (same roundings, a
    # different rstd ulp and summation order), plus float32 accumulation noise
    assert_2x_rule("score_head (raw)", out, ref, ideal, rel_floor=1e-5)
    assert torch.allclose(out, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    # the op (what THEMIS_KERNELS=cuda runs): bf16, against reference.score_head
    from themis_engine.kernels import cuda_ext

    op_out = cuda_ext.score_head(hidden, idx, w, head, 1e-6)
    assert op_out.dtype == torch.bfloat16
    assert_2x_rule("score_head", op_out, reference.score_head(hidden, idx, w, head, 1e-6), ideal,
                   floor=eps_floor(torch.bfloat16, ideal))


@pytest.mark.gpu
def test_gpu_score_head_strided_and_out_of_range(ops):
    dev = torch.device("cuda")
    big = torch.randn(64, 1040, device=dev).to(torch.bfloat16)
    hidden = big[:, :1024]  # row stride 1040: a view, no copy
    w = torch.ones(1024, device=dev, dtype=torch.bfloat16)
    head = torch.randn(5, 1024, device=dev).to(torch.bfloat16)
    idx = torch.tensor([0, 63, 64, -1, 5], device=dev)
    out = ops.score_head(hidden, idx, w, head, 1e-6)
    ok = torch.tensor([0, 1, 4])
    ref = _raw_score_head_reference(hidden, idx[ok], w, head, 1e-6)
    assert torch.allclose(out[ok], ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    assert torch.isnan(out[2]).all() and torch.isnan(out[3]).all()  # rows outside [0, T) give NaN


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 8), (7, 1024), (4096, 5120), (3, 5, 4096), (33, 59), (2, 1000), (2, 32768)])
def test_gpu_add_rmsnorm_matches_reference(ops, shape):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(shape[-1])
    x = (torch.randn(shape, device=dev, generator=g) * 4).to(torch.bfloat16)
    r = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)
    w = (1 + 0.2 * torch.randn(shape[-1], device=dev, generator=g)).to(torch.bfloat16)
    y, h = ops.add_rmsnorm(x, r, w, 1e-6)
    y_ref, h_ref = reference.rms_norm(x, w, 1e-6, r)
    assert torch.equal(h, h_ref)  # the residual add is exact: one rounding of an exact float32 sum
    # y: bf16 results; a 1-ulp difference of rstd can flip a rounding: a few elements by <= 2 bf16 ulps
    diff = (y.float() - y_ref.float()).abs()
    assert (diff <= 2**-6 * y_ref.float().abs() + 1e-6).all(), diff.max()
    assert (diff > 0).float().mean() < 0.02
    # the Triton kernel the engine uses today agrees the same way
    y_tr, h_tr = kernels.rms_norm(x, w, 1e-6, r)
    assert torch.equal(h_tr, h) and ((y_tr.float() - y.float()).abs() <= 2**-6 * y.float().abs() + 1e-6).all()


@pytest.mark.gpu
def test_gpu_ops_trace(ops):
    """The themis:: ops have fake implementations (shapes for torch.compile) and pass torch.library's
    checks."""
    from themis_engine.kernels import cuda_ext

    dev = torch.device("cuda")
    hidden = torch.randn(40, 256, device=dev).to(torch.bfloat16)
    idx = torch.tensor([3, 39], device=dev)
    w = torch.ones(256, device=dev, dtype=torch.bfloat16)
    head = torch.randn(5, 256, device=dev).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.themis.score_head_cuda.default, (hidden, idx, w, head, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.themis.add_rms_norm_cuda.default, (hidden, hidden.clone(), w, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda a, b: cuda_ext.add_rms_norm(a, w, 1e-6, b)[0] * 2, fullgraph=True)
    assert torch.equal(f(hidden, hidden), ops.add_rmsnorm(hidden, hidden, w, 1e-6)[0] * 2)


@pytest.mark.gpu
def test_gpu_dispatch_runs_the_extension(ops, themis_kernels):
    """THEMIS_KERNELS=cuda in inference: kernels.score_head and kernels.rms_norm(residual=) run the
    extension and agree with their references (the ops of RewardModel.forward and the blocks)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    hidden = torch.randn(300, 1024, device=dev, generator=g).to(torch.bfloat16)
    r = torch.randn(300, 1024, device=dev, generator=g).to(torch.bfloat16)
    idx = torch.tensor([0, 17, 299], device=dev)
    w = (1 + 0.2 * torch.randn(1024, device=dev, generator=g)).to(torch.bfloat16)
    head = (torch.randn(5, 1024, device=dev, generator=g) * 1024**-0.5).to(torch.bfloat16)
    themis_kernels("cuda")
    with torch.inference_mode():
        assert kernels.backend_for("score_head", hidden) == "cuda"
        got = kernels.score_head(hidden, idx, w, head, 1e-6)
        y, h = kernels.rms_norm(hidden, w, 1e-6, r)
    ideal = _ideal_score_head(hidden, idx, w, head, 1e-6)
    assert_2x_rule("score_head", got, reference.score_head(hidden, idx, w, head, 1e-6), ideal,
                   floor=eps_floor(torch.bfloat16, ideal))
    assert torch.equal(h, reference.rms_norm(hidden, w, 1e-6, r)[1])
    assert torch.equal(y, ops.add_rmsnorm(hidden, r, w, 1e-6)[0])


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A JIT build killed by a signal leaves build_dir/lock behind; later builds would wait on it forever."""
    import os
    import time

    from themis_engine.kernels import cuda_ext

    lock = tmp_path / "lock"
    lock.write_text("")
    cuda_ext._clear_stale_lock(tmp_path)
    assert lock.exists()  # another process may be building right now
    old = time.time() - cuda_ext.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cuda_ext._clear_stale_lock(tmp_path)
    assert not lock.exists()
    cuda_ext._clear_stale_lock(tmp_path)  # no lock: nothing to do
