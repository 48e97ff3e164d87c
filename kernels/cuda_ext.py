"""The CUDA scoring kernels of csrc/cuda/: reference math, a loader, and a benchmark.

Ops (torch.library, namespace `themis_cuda`, CUDA only, inference only, bf16):

* `score_head(hidden [T, D], score_index [N] int64, norm_weight [D], head [H, D], eps) -> [N, H] float32`:
  final RMSNorm at the score positions and the reward head, fused;
* `add_rmsnorm(x [..., D], residual [..., D], weight [D], eps) -> (y, h)`: h = x + residual (bf16),
  y = RMSNorm(h) (bf16), as `kernels.rms_norm(x, weight, eps, residual)`.

The references below are the CPU oracle of the GPU tests; they are the engine's own ops
(`kernels.reference`), composed as the model composes them. The loader builds csrc/cuda (nvcc +
the C++ binding) on first use, on a machine with CUDA only; nothing imports this module at package
import time, and the kernels are not on the default scoring path (no GPU measurement yet says they
are faster; see csrc/cuda/README.md).

    python -m themis_engine.kernels.cuda_ext --bench      # on a GPU: each kernel vs its Triton/PyTorch path
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from themis_engine.kernels import reference

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
SOURCES = ("binding.cpp", "score_head.cu", "add_rmsnorm.cu")
HEADERS = ("themis_cuda.h", "common.cuh")
EXT_NAME = "themis_cuda_ext"


# --------------------------------------------------------------------------------------------
# Reference math (CPU or GPU, any float dtype)
# --------------------------------------------------------------------------------------------
def score_head_reference(hidden, score_index, norm_weight, head, eps: float) -> torch.Tensor:
    """float32 [N, H]: rms_norm(hidden[score_index]) in hidden's dtype (HF rounding order), then the
    head's dot products in float32 (the kernel does not round them to bf16, unlike nn.Linear)."""
    z = reference.rms_norm(hidden[score_index], norm_weight, eps)  # [N, D]
    return z.float() @ head.float().T


def add_rmsnorm_reference(x, residual, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = x + residual in x's dtype, y = rms_norm(h) (statistics in float32)."""
    return reference.rms_norm(x, weight, eps, residual)


# --------------------------------------------------------------------------------------------
# Build and load
# --------------------------------------------------------------------------------------------
def _source_paths() -> list[Path]:
    paths = [CSRC / s for s in SOURCES]
    missing = [str(p) for p in paths + [CSRC / h for h in HEADERS] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"themis_cuda: sources not found ({', '.join(missing)}); the CUDA kernels "
                                "build from a source tree (pip install -e .)")
    return paths


def _build_dir() -> Path:
    """A cache folder per (sources, torch, CUDA, card) so a changed source or card rebuilds."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((CSRC / name).read_bytes())
    major, minor = torch.cuda.get_device_capability()
    h.update(f"{torch.__version__}|{torch.version.cuda}|sm_{major}{minor}".encode())
    root = os.environ.get("THEMIS_CUDA_BUILD_DIR") or Path.home() / ".cache" / "themis_engine" / "cuda_ext"
    path = Path(root) / h.hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_with_nvcc(build_dir: Path, verbose: bool) -> Path:
    """The same build without ninja (torch's loader needs it): one nvcc call compiles and links."""
    from torch.utils import cpp_extension as ce

    nvcc = os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else shutil.which("nvcc")
    if not nvcc:
        raise RuntimeError("themis_cuda: nvcc not found (set CUDA_HOME)")
    try:
        includes = ce.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6 spelled it include_paths(cuda=True)
        includes = ce.include_paths(True)
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    major, minor = torch.cuda.get_device_capability()
    out = build_dir / f"{EXT_NAME}.so"
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # renamed when complete: no half-written .so
    cmd = [
        nvcc, "-shared", "-O3", "-std=c++20", "-Xcompiler", "-fPIC", "-cudart", "shared",
        f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{CSRC}", *[f"-I{p}" for p in includes],
        *[str(p) for p in _source_paths()],
        f"-L{lib_dir}", "-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu", "-Xlinker", f"-rpath={lib_dir}",
        "-o", str(tmp),
    ]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"themis_cuda: nvcc build failed:\n{res.stdout}\n{res.stderr}")
    os.replace(tmp, out)
    return out


_LOADED: list = []
STALE_LOCK_S = 300


def _clear_stale_lock(build_dir: Path) -> None:
    """torch's JIT build holds build_dir/lock and removes it in a `finally`; a build killed by a
    signal leaves it, and every later build waits on it forever. A lock older than STALE_LOCK_S
    (longer than a build takes) is such a leftover."""
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            print(f"themis_cuda: removed a stale build lock {lock}", file=sys.stderr)
    except FileNotFoundError:
        pass


def load(verbose: bool = False):
    """Build (once per source/torch/card, cached on disk) and load the kernels, once per process;
    returns torch.ops.themis_cuda. CUDA machines only."""
    if _LOADED:
        return _LOADED[0]
    if not torch.cuda.is_available():
        raise RuntimeError("themis_cuda: the CUDA scoring kernels need a CUDA GPU")
    sources = _source_paths()
    build_dir = _build_dir()
    from torch.utils import cpp_extension as ce

    _clear_stale_lock(build_dir)
    if ce.is_ninja_available():
        ce.load(
            name=EXT_NAME, sources=[str(p) for p in sources], extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], build_directory=str(build_dir),
            is_python_module=False, verbose=verbose,
        )
    else:
        so = build_dir / f"{EXT_NAME}.so"
        if not so.is_file():
            so = _build_with_nvcc(build_dir, verbose)
        torch.ops.load_library(str(so))
    _register_fakes()
    _LOADED.append(torch.ops.themis_cuda)
    return _LOADED[0]


def _register_fakes() -> None:
    """Shapes for FakeTensor / torch.compile tracing."""

    @torch.library.register_fake("themis_cuda::score_head")
    def _score_head_fake(hidden, score_index, norm_weight, head, eps):
        return hidden.new_empty((score_index.shape[0], head.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("themis_cuda::add_rmsnorm")
    def _add_rmsnorm_fake(x, residual, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
            x, memory_format=torch.contiguous_format)


def score_head(hidden, score_index, norm_weight, head, eps: float) -> torch.Tensor:
    """The fused kernel (see score_head_reference for the math)."""
    return load().score_head(hidden, score_index, norm_weight, head, float(eps))


def add_rmsnorm(x, residual, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel (see add_rmsnorm_reference for the math)."""
    return load().add_rmsnorm(x, residual, weight, float(eps))


# --------------------------------------------------------------------------------------------
# Benchmark: each kernel against the path the engine takes today (Triton RMSNorm + cuBLAS)
# --------------------------------------------------------------------------------------------
def _time_us(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    times.sort()
    return times[len(times) // 2]


def bench(shapes=None) -> list[dict]:
    """Median microseconds of each kernel and of its engine counterpart, same inputs, same card."""
    import torch.nn.functional as F

    from themis_engine import kernels

    dev, bf = torch.device("cuda"), torch.bfloat16
    eps = 1e-6
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for T, D, N, H in shapes or [(32768, 5120, 64, 5), (32768, 1024, 256, 5), (8192, 4096, 16, 1)]:
        hidden = torch.randn(T, D, device=dev, dtype=bf, generator=g)
        idx = torch.randint(0, T, (N,), device=dev, generator=g)
        w = (1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(bf)
        head = (torch.randn(H, D, device=dev, generator=g) * D**-0.5).to(bf)
        ours = _time_us(lambda: score_head(hidden, idx, w, head, eps))
        theirs = _time_us(lambda: F.linear(kernels.rms_norm(hidden[idx], w, eps), head))
        err = (score_head(hidden, idx, w, head, eps) - score_head_reference(hidden, idx, w, head, eps)).abs().max()
        rows.append(dict(op="score_head", shape=f"T={T} D={D} N={N} H={H}", cuda_us=ours, engine_us=theirs,
                         engine_path="gather + Triton rms_norm + cuBLAS", max_abs_err=float(err)))
        x, r = torch.randn_like(hidden), torch.randn_like(hidden)
        ours = _time_us(lambda: add_rmsnorm(x, r, w, eps))
        theirs = _time_us(lambda: kernels.rms_norm(x, w, eps, r))
        y, h = add_rmsnorm(x, r, w, eps)
        y_ref, h_ref = add_rmsnorm_reference(x, r, w, eps)
        rows.append(dict(op="add_rmsnorm", shape=f"rows={T} D={D}", cuda_us=ours, engine_us=theirs,
                         engine_path=f"{kernels.backend_for('rms_norm', x)} rms_norm(residual=)",
                         max_abs_err=float(max((y - y_ref).abs().max(), (h - h_ref).abs().max()))))
        del hidden, x, r
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="themis_cuda kernels: build, and benchmark against the engine's path")
    p.add_argument("--bench", action="store_true", help="time each kernel and its counterpart (GPU)")
    p.add_argument("--verbose", action="store_true")
    opt = p.parse_args(argv)
    load(verbose=opt.verbose)
    print(f"themis_cuda loaded on {torch.cuda.get_device_name()} (torch {torch.__version__})")
    if opt.bench:
        print("| op | shape | CUDA kernel us | engine path us | speedup | engine path | max abs err vs reference |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in bench():
            print(f"| {r['op']} | {r['shape']} | {r['cuda_us']:.1f} | {r['engine_us']:.1f} | "
                  f"{r['engine_us'] / r['cuda_us']:.2f}x | {r['engine_path']} | {r['max_abs_err']:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
