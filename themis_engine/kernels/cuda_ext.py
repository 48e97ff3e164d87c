"""The CUDA extension backend (csrc/cuda): a loader, the ops, and a benchmark. Experimental.

`themis_engine.kernels.backend_for` picks this backend only under THEMIS_KERNELS=cuda, set
explicitly ("auto" never does: these kernels have not yet run on a GPU), for two ops, on bfloat16
CUDA tensors with grad mode off (inference only: no backward):

* `score_head(hidden [T, D], score_index [N] int64, norm_weight [D], head_weight [H, D], eps) -> [N, H]`
  (bf16): the final RMSNorm at the score rows and the reward head in one kernel; the op of
  `reference.score_head`. The kernel's dot products are float32 and rounded once to bf16 here (cuBLAS
  rounds the same float32 sums); a score index outside [0, T) gives a NaN row, not an IndexError.
* `add_rms_norm(x [..., D], weight [D], eps, residual [..., D]) -> (y, h)`: h = x + residual (bf16),
  y = RMSNorm(h) (bf16); the op of `reference.rms_norm(x, weight, eps, residual)`.

Call path, as every op of the package: these functions -> custom ops `themis::score_head_cuda`,
`themis::add_rms_norm_cuda` (kernels._utils.custom_op, fakes right under them) -> the C++ binding
(torch.ops.themis_cuda.*, csrc/cuda/binding.cpp) -> the raw-pointer launchers of csrc/cuda/*.cu.
The loader builds csrc/cuda (nvcc + the binding) on first use, on a machine with CUDA only; nothing
imports this module at package import time.

    python -m themis_engine.kernels.cuda_ext --bench      # on a GPU: each kernel vs the Triton path
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

from themis_engine.config import ENVIRONMENT, environ
from themis_engine.kernels._utils import custom_op

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
SOURCES = ("binding.cpp", "score_head.cu", "add_rmsnorm.cu")
HEADERS = ("themis_cuda.h", "common.cuh")
EXT_NAME = "themis_cuda_ext"


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
    root = environ("THEMIS_CUDA_BUILD_DIR") or ENVIRONMENT["THEMIS_CUDA_BUILD_DIR"].default
    path = Path(root).expanduser() / h.hexdigest()[:16]
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
    _LOADED.append(torch.ops.themis_cuda)
    return _LOADED[0]


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------
@custom_op("score_head_cuda")
def _score_head_cuda(
    hidden: torch.Tensor, score_index: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """[N, H] float32: the raw kernel's unrounded dot products."""
    return load().score_head(hidden, score_index, norm_weight, head_weight, eps)


@_score_head_cuda.register_fake
def _(hidden, score_index, norm_weight, head_weight, eps):
    return hidden.new_empty((score_index.shape[0], head_weight.shape[0]), dtype=torch.float32)


@custom_op("add_rms_norm_cuda")
def _add_rms_norm_cuda(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h), both contiguous bf16 of x's shape."""
    return load().add_rmsnorm(x, residual, weight, eps)


@_add_rms_norm_cuda.register_fake
def _(x, residual, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def score_head(hidden, score_index, norm_weight, head_weight, eps: float) -> torch.Tensor:
    """reference.score_head in one kernel, [N, H] in hidden's dtype (bf16); see the module docstring."""
    return _score_head_cuda(hidden, score_index, norm_weight, head_weight, float(eps)).to(hidden.dtype)


def add_rms_norm(x, weight, eps: float, residual) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.rms_norm(x, weight, eps, residual) in one kernel: (y, h), bf16."""
    return _add_rms_norm_cuda(x, residual, weight, float(eps))


# --------------------------------------------------------------------------------------------
# Benchmark: each kernel against the path the engine takes by default (Triton RMSNorm + cuBLAS)
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


@torch.no_grad()
def bench(shapes=None) -> list[dict]:
    """Median microseconds of each kernel and of its Triton counterpart, same inputs, same card, and
    the largest difference of their results."""
    from themis_engine.kernels import rmsnorm_kernel

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
        theirs = _time_us(lambda: rmsnorm_kernel.score_head(hidden, idx, w, head, eps))
        err = (score_head(hidden, idx, w, head, eps).float()
               - rmsnorm_kernel.score_head(hidden, idx, w, head, eps).float()).abs().max()
        rows.append(dict(op="score_head", shape=f"T={T} D={D} N={N} H={H}", cuda_us=ours, engine_us=theirs,
                         engine_path="gather + Triton rms_norm + cuBLAS", max_abs_diff=float(err)))
        x, r = torch.randn_like(hidden), torch.randn_like(hidden)
        ours = _time_us(lambda: add_rms_norm(x, w, eps, r))
        theirs = _time_us(lambda: rmsnorm_kernel.rms_norm(x, w, eps, r))
        y, h = add_rms_norm(x, w, eps, r)
        y_tr, h_tr = rmsnorm_kernel.rms_norm(x, w, eps, r)
        rows.append(dict(op="add_rms_norm", shape=f"rows={T} D={D}", cuda_us=ours, engine_us=theirs,
                         engine_path="Triton rms_norm(residual=)",
                         max_abs_diff=float(max((y - y_tr).abs().max(), (h - h_tr).abs().max()))))
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
        print("| op | shape | CUDA kernel us | Triton path us | speedup | Triton path | max abs diff |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in bench():
            print(f"| {r['op']} | {r['shape']} | {r['cuda_us']:.1f} | {r['engine_us']:.1f} | "
                  f"{r['engine_us'] / r['cuda_us']:.2f}x | {r['engine_path']} | {r['max_abs_diff']:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
