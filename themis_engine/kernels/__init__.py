"""themis_engine.kernels: the engine's ops, with the backend chosen in one place.

Every op is one public function here with the signature of its reference in `reference.py`.
`backend_for(op, x)` decides, for the tensor an op receives, which implementation runs:

* "triton"    the Triton kernels (KERNEL_MODULES; kernels/<op>_kernel.py);
* "cuda"      the CUDA extension of csrc/cuda (cuda_ext.py) for the ops in CUDA_EXT_OPS: the fused
              final norm + reward head (score_head) and the fused residual add + RMSNorm
              (rms_norm with `residual`, op name "add_rms_norm"); inference only, bfloat16;
* "scaled_mm" FP8 weights (op "fp8_matmul", model/fp8.py): torch._scaled_mm on FP8 tensor cores;
* "sdpa"      attention on CPU tensors (SDPA_OPS; cpu_attention.py): PyTorch's fused (flash) CPU
              attention: a causal call per segment, two (prefix keys, own keys) merged by lse per
              suffix, with the lse and a backward; 4-7x faster than the reference
              forward, about 3x forward + backward (2 cores, CRB-sized segments);
* "reference" the plain-PyTorch references (`reference.py`; for fp8_matmul: the dequantized matmul).

THEMIS_KERNELS (listed in config.ENVIRONMENT), read by `backend_for` and nowhere else, at every call:

* "auto" (default): "triton" on CUDA tensors (the ops of AWAITING_GPU_VALIDATION excepted),
  "scaled_mm" for fp8_matmul on CUDA; on the CPU "sdpa" for attention and "reference" for the
  rest. Never "cuda".
* "reference": the references everywhere (attention on the CPU included: the oracle, and the
  way to compare with it).
* "triton": the Triton kernels on any tensor, the CPU included (with TRITON_INTERPRET=1 set before
  Triton is imported that is how the tests run the kernels on a machine with no GPU); an op
  without a kernel warns and runs its reference.
* "cuda": as "auto" ("sdpa" for attention on the CPU), and the CUDA extension for the ops it
  serves, on bfloat16 CUDA tensors with grad mode off (the extension has no backward). Only ever
  on explicit request: those kernels have not yet run on a GPU (csrc/cuda/README.md). It is built
  on first use and a failed build raises.

Kernels themselves never branch on the device or read the environment.
"""

from __future__ import annotations

import importlib
import warnings
from functools import lru_cache
from typing import Callable

import torch

from themis_engine.config import ENVIRONMENT, environ
from themis_engine.kernels import reference
from themis_engine.kernels.reference import MAGNITUDE_FORMS, BTOutput

# op name -> module (in this package) that defines a Triton-backed function of that name
KERNEL_MODULES = {
    "attention": "attention_kernel",
    "rms_norm": "rmsnorm_kernel",
    "rope": "rope_kernel",
    "qk_norm_rope": "rope_kernel",
    "swiglu": "swiglu_kernel",
    "bt_loss": "bt_loss_kernel",
    "linear_cross_entropy": "linear_ce_kernel",
    "score_head": "rmsnorm_kernel",
}
# ops run by another op's function (its Triton kernel and its reference): rms_norm with the residual
_SAME_FUNCTION = {"add_rms_norm": "rms_norm"}
# ops the CUDA extension serves (functions of these names in cuda_ext.py), under THEMIS_KERNELS=cuda
CUDA_EXT_OPS = ("add_rms_norm", "score_head")
# ops whose fast path is torch's FP8 GEMM, run by the caller (FP8Linear) when this says "scaled_mm"
SCALED_MM_OPS = ("fp8_matmul",)
# ops with a fused PyTorch CPU path (cpu_attention.py), run on CPU tensors under "auto" and "cuda"
SDPA_OPS = ("attention",)
OPS = (*KERNEL_MODULES, *_SAME_FUNCTION, *SCALED_MM_OPS)

BACKENDS = ENVIRONMENT["THEMIS_KERNELS"].choices  # auto, triton, reference, cuda

# Kernels whose latest version has not yet passed its GPU tests on a card: "auto" keeps the reference
# for them on CUDA (THEMIS_KERNELS=triton still forces them). bt_loss: its d_hidden was rewritten after
# the first H200 run showed the old one wrong there (2026-11-26); the new one passes under the
# interpreter only. The reference costs about the same (a [N, D] x [D, H] product).
AWAITING_GPU_VALIDATION = frozenset({"bt_loss"})


def _requested_backend() -> str:
    """THEMIS_KERNELS, lower-cased; a value outside BACKENDS is a ConfigError (a ValueError)."""
    return environ("THEMIS_KERNELS") or "auto"


@lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@lru_cache(maxsize=None)
def _kernel(op: str) -> Callable | None:
    """The Triton-backed function of `op`, or None where its kernel module is absent."""
    op = _SAME_FUNCTION.get(op, op)
    try:
        module = importlib.import_module(f".{KERNEL_MODULES[op]}", __name__)
    except ModuleNotFoundError as err:
        if err.name and err.name.endswith(KERNEL_MODULES[op]):
            return None  # this op has no Triton kernel yet: the reference serves
        raise
    return getattr(module, op)


# whether this torch has the fused CPU attention with its lse (every torch >= 2.3); a constant, so
# that torch.compile traces backend_for without a cached call
_SDPA_AVAILABLE = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _sdpa_function(op: str) -> Callable:
    from themis_engine.kernels import cpu_attention

    return getattr(cpu_attention, op)


def _cuda_ext_function(op: str) -> Callable:
    from themis_engine.kernels import cuda_ext  # imported (and built) only when asked for

    return getattr(cuda_ext, op)


def backend_for(op: str, x) -> str:
    """The backend that runs `op` on tensor `x`: "triton", "cuda", "scaled_mm", "sdpa" or
    "reference" (see the module docstring for THEMIS_KERNELS)."""
    if op not in OPS:
        raise ValueError(f"backend_for: unknown op {op!r}; the ops are {OPS}")
    requested = _requested_backend()
    if requested == "reference":
        return "reference"
    if op in SCALED_MM_OPS:
        return "scaled_mm" if x.is_cuda else "reference"
    if (requested == "cuda" and op in CUDA_EXT_OPS and x.is_cuda and x.dtype == torch.bfloat16
            and not torch.is_grad_enabled()):
        return "cuda"
    if requested != "triton" and not x.is_cuda and x.device.type == "cpu" and op in SDPA_OPS and _SDPA_AVAILABLE:
        return "sdpa"
    if requested != "triton" and (not x.is_cuda or op in AWAITING_GPU_VALIDATION):
        return "reference"
    if not _triton_available() or _kernel(op) is None:
        if requested == "triton":
            warnings.warn(f"THEMIS_KERNELS=triton but op {op!r} has no Triton kernel here; using the reference")
        return "reference"
    return "triton"


def implementation(op: str, x) -> Callable:
    """The function that runs `op` on tensor `x` (see backend_for); its signature is the reference's."""
    return _function(op, backend_for(op, x))


def _function(op: str, backend: str) -> Callable:
    if backend == "triton":
        return _kernel(op)
    if backend == "cuda":
        return _cuda_ext_function(op)
    if backend == "sdpa":
        return _sdpa_function(op)
    if backend == "reference" and op not in SCALED_MM_OPS:
        return getattr(reference, _SAME_FUNCTION.get(op, op))
    raise ValueError(f"implementation: {op!r} is run by model/fp8.py (FP8Linear); ask backend_for instead")


ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)  # what the Triton attention kernel takes (powers of two)
_warned_head_dims: set = set()


def attention(q, k, v, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale):
    """Prefix-shared varlen attention; see reference.attention. Returns (out, lse). A head dim the
    Triton kernel does not take runs on the reference (warned once per head dim); the CPU's "sdpa"
    path takes any head dim."""
    backend = backend_for("attention", q)
    D = q.shape[-1]
    if backend == "triton" and D not in ATTENTION_HEAD_DIMS:
        if D not in _warned_head_dims:
            _warned_head_dims.add(D)
            warnings.warn(f"attention: head dim {D} is not one the Triton kernel takes {ATTENTION_HEAD_DIMS}; "
                          "using the PyTorch reference (slower, quadratic memory per segment)")
        backend = "reference"
    return _function("attention", backend)(q, k, v, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale)


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm, optionally fused with the residual add (op "add_rms_norm"); see reference.rms_norm."""
    if residual is None:
        return implementation("rms_norm", x)(x, weight, eps)
    return implementation("add_rms_norm", x)(x, weight, eps, residual)


def score_head(hidden, score_index, norm_weight, head_weight, eps):
    """The final RMSNorm at the score rows and the reward head, [N, H]; see reference.score_head."""
    return implementation("score_head", hidden)(hidden, score_index, norm_weight, head_weight, eps)


def rope(x, position_ids, inv_freq, attention_scaling=1.0):
    """Rotary embedding at packed positions; see reference.rope."""
    return implementation("rope", x)(x, position_ids, inv_freq, attention_scaling)


def qk_norm_rope(x, norm_weight, eps, position_ids, inv_freq, attention_scaling=1.0):
    """Per-head RMSNorm then RoPE (Qwen3's q/k path), one kernel on CUDA; see reference.qk_norm_rope."""
    return implementation("qk_norm_rope", x)(x, norm_weight, eps, position_ids, inv_freq, attention_scaling)


def swiglu(gate, up):
    """silu(gate) * up; see reference.swiglu."""
    return implementation("swiglu", gate)(gate, up)


def bt_loss(hidden_chosen, hidden_rejected, weight, mask, margin=None, mu=0.0, magnitude="centering", normalizer=None):
    """Multi-head Bradley-Terry loss with the reward-magnitude term; see reference.bt_loss."""
    return implementation("bt_loss", hidden_chosen)(
        hidden_chosen, hidden_rejected, weight, mask, margin, mu, magnitude, normalizer
    )


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, normalizer=None):
    """Cross-entropy of hidden @ weight.T, chunked on the kernel path; see reference.linear_cross_entropy."""
    return implementation("linear_cross_entropy", hidden)(hidden, weight, labels, ignore_index, normalizer)


__all__ = [
    "BACKENDS",
    "BTOutput",
    "CUDA_EXT_OPS",
    "KERNEL_MODULES",
    "MAGNITUDE_FORMS",
    "OPS",
    "SDPA_OPS",
    "attention",
    "backend_for",
    "bt_loss",
    "implementation",
    "linear_cross_entropy",
    "qk_norm_rope",
    "reference",
    "rms_norm",
    "rope",
    "score_head",
    "swiglu",
]
