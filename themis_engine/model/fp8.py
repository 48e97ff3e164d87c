"""FP8 weights for scoring: the decoder blocks' linear weights in e4m3 with per-output-channel scales.

    rm = te.RewardModel.from_pretrained(path, dtype=torch.bfloat16, device="cuda", quantize="fp8")
    report = quantize_model(rm)          # or in place on a loaded model; report.bytes_saved

What is quantized: q/k/v/o_proj and gate/up/down_proj of every block (`FP8_TARGETS`). Embeddings,
norms, the reward head and the LM head stay in the model's dtype. Each weight W [out, in] becomes

    scale[o]   = amax_i |W[o, i]| / 448          (448 = largest finite e4m3fn; float32 [out])
    W_fp8[o,i] = e4m3(W[o, i] / scale[o])        (round to nearest even; float8_e4m3fn [out, in])

so W ≈ W_fp8 * scale[:, None]: e4m3 keeps 3 mantissa bits, a relative error <= 2^-4 per element in
the normal range (|W / scale| >= 2^-6), an absolute error <= 2^-10 * scale below it (subnormals).

`FP8Linear.forward(x)` on a CUDA card with FP8 matrix instructions (compute capability >= 8.9, and
both matrix dims multiples of 16) quantizes the activations per row on the fly
(scale_x[t] = amax |x[t, :]| / 448) and runs `torch._scaled_mm` with row-wise scales, bf16 out:
y[t, o] = sum_i x_fp8[t, i] * W_fp8[o, i] * scale_x[t] * scale[o] (+ bias). Elsewhere (CPU, older
cards, THEMIS_KERNELS=reference) it dequantizes the weight and runs a normal matmul: that path is
the reference the tests use. Inference only (no backward through FP8Linear).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from themis_engine import kernels
from themis_engine.config import environ

logger = logging.getLogger("themis_engine")

# the linear layers of a decoder block that get FP8 weights (module paths inside a Block)
FP8_TARGETS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
# Modules that read the same input tensor, in the model's call order: the activation quantized for
# the first is reused by the others (Attention calls q, k, v on one x; MLP calls gate, up on one x).
_SHARED_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn}
_ROW_CHUNK_ELEMS = 1 << 26  # eager activation quantization works on <= 64M elements at a time


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


# --------------------------------------------------------------------------------------------
# Quantize / dequantize (the reference math; also what quantize_model stores)
# --------------------------------------------------------------------------------------------
def quantize_weight(
    weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (weight_fp8 [out, in] `dtype`, scale [out] float32),
    per output channel: scale = amax / fmax (1.0 for an all-zero row)."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D weight, got shape {tuple(weight.shape)}")
    fmax = fp8_max(dtype)
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    w_fp8 = (w / scale[:, None]).clamp_(-fmax, fmax).to(dtype)
    return w_fp8, scale


def dequantize_weight(weight_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(weight_fp8 [out, in], scale [out]) -> weight [out, in] in `dtype` (product in float32)."""
    return (weight_fp8.float() * scale[:, None]).to(dtype)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row activation quantization: x [M, K] -> (x_fp8 [M, K], scale [M, 1] float32) with
    x ≈ x_fp8 * scale. Eager PyTorch, in row chunks so that the float32 temporary stays bounded."""
    fmax = fp8_max(dtype)
    M, K = x.shape
    out = torch.empty((M, K), dtype=dtype, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    step = max(1, _ROW_CHUNK_ELEMS // max(K, 1))
    for a in range(0, M, step):
        xs = x[a : a + step].float()
        amax = xs.abs().amax(dim=1, keepdim=True)
        s = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
        out[a : a + step] = (xs / s).clamp_(-fmax, fmax).to(dtype)
        scale[a : a + step] = s
    return out, scale


@lru_cache(maxsize=None)
def _compiled_quantize_rows():
    """quantize_rows as one fused kernel (torch.compile; no chunking: Inductor's kernel keeps no
    float32 temporary). THEMIS_FP8_COMPILE=0 keeps the eager version."""
    if environ("THEMIS_FP8_COMPILE") == "0":
        return quantize_rows

    def fused(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn):
        fmax = fp8_max(dtype)
        xf = x.float()
        amax = xf.abs().amax(dim=1, keepdim=True)
        s = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
        return (xf / s).clamp(-fmax, fmax).to(dtype), s

    return torch.compile(fused, dynamic=True)


# --------------------------------------------------------------------------------------------
# Backend choice, in one place
# --------------------------------------------------------------------------------------------
_COMPILE_FAILED = [False]


def fp8_matmul_supported(device: torch.device) -> bool:
    """True on a CUDA card with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, later)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_backend(x: torch.Tensor, weight_fp8: torch.Tensor) -> str:
    """How FP8Linear runs on input x: "scaled_mm" (FP8 tensor cores) or "dequantize" (reference).
    THEMIS_KERNELS is read by kernels.backend_for ("fp8_matmul": "reference" under
    THEMIS_KERNELS=reference and off CUDA); the card and the weight decide the rest here."""
    if kernels.backend_for("fp8_matmul", x) != "scaled_mm":
        return "dequantize"
    if weight_fp8.dtype != torch.float8_e4m3fn:
        return "dequantize"
    N, K = weight_fp8.shape
    if K % 16 or N % 16 or not fp8_matmul_supported(x.device):  # _scaled_mm needs both dims % 16
        return "dequantize"
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return "scaled_mm" if _rowwise_scaled_mm_works(index) else "dequantize"


@lru_cache(maxsize=None)
def _rowwise_scaled_mm_works(index: int) -> bool:
    """Probe once per card: a torch build may lack row-wise-scaled FP8 GEMMs for it (then warn and
    use the dequantized path there)."""
    dev = torch.device("cuda", index)
    try:
        a = torch.ones(16, 32, device=dev).to(torch.float8_e4m3fn)
        b = torch.ones(16, 32, device=dev).to(torch.float8_e4m3fn)
        sa = torch.ones(16, 1, device=dev)
        sb = torch.ones(1, 16, device=dev)
        y = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        ok = bool((y.float() == 32).all())
    except Exception as err:  # noqa: BLE001 - any refusal of _scaled_mm's (RuntimeError, ValueError, ...)
        warnings.warn(f"FP8Linear: row-wise torch._scaled_mm is not available on {torch.cuda.get_device_name(dev)} "
                      f"({err}); FP8 weights are dequantized for the matmul there")
        return False
    if not ok:
        warnings.warn("FP8Linear: row-wise torch._scaled_mm gave a wrong result on a probe; using dequantized weights")
    return ok


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------
class _InputCache:
    """The last quantized activation of one block's shared-input linears (see _SHARED_INPUT):
    keyed by the identity of the input tensor, which it keeps alive until `release`."""

    __slots__ = ("x", "x_fp8", "scale")

    def __init__(self):
        self.release()

    def lookup(self, x):
        return (self.x_fp8, self.scale) if self.x is x else None

    def store(self, x, x_fp8, scale):
        self.x, self.x_fp8, self.scale = x, x_fp8, scale

    def release(self):
        self.x = self.x_fp8 = self.scale = None


class FP8Linear(nn.Module):
    """A Linear whose weight is stored in FP8 with a float32 scale per output channel.

    weight_fp8: [out, in] float8_e4m3fn (buffer); scale: [out] float32 (buffer); bias: [out] in the
    compute dtype or None. forward(x [..., in]) -> [..., out] in x.dtype (see the module docstring
    for the two paths). `fast_accum`: _scaled_mm's faster, less exact accumulation (default off).
    """

    def __init__(self, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 fast_accum: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.fast_accum = fast_accum
        # set by quantize_model: the shared-input cache and this module's place among its users
        self._cache: _InputCache | None = None
        self._cache_role: str | None = None  # "first" | "middle" | "last"

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.float8_e4m3fn, fast_accum: bool = False):
        w_fp8, scale = quantize_weight(linear.weight, dtype)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(w_fp8, scale, bias, fast_accum)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.weight_fp8, self.scale, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.weight_fp8.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fp8_backend(x, self.weight_fp8) == "scaled_mm":
            return self._forward_scaled_mm(x)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _quantized_input(self, x: torch.Tensor, x2: torch.Tensor):
        """(x_fp8, scale) of x2 = x as rows; shared with the other users of the same x object."""
        cache, role = self._cache, self._cache_role
        hit = cache.lookup(x) if cache is not None and role != "first" else None
        if hit is None:
            hit = _quantize_rows_fast(x2)
        if cache is not None:
            if role == "first":
                cache.store(x, *hit)
            elif role == "last":
                cache.release()
        return hit

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.shape[0] == 0:
            return x.new_empty(*shape[:-1], self.out_features)
        x_fp8, x_scale = self._quantized_input(x, x2)
        y = torch._scaled_mm(
            x_fp8, self.weight_fp8.t(),  # [M, K] row-major @ [K, N] column-major
            scale_a=x_scale, scale_b=self.scale.view(1, -1),
            out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum,
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def _quantize_rows_fast(x2: torch.Tensor):
    """The fused quantizer on CUDA; the eager one if compiling fails (warned once)."""
    if not _COMPILE_FAILED[0]:
        try:
            return _compiled_quantize_rows()(x2)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, say so once
            _COMPILE_FAILED[0] = True
            warnings.warn(f"FP8Linear: torch.compile of the activation quantizer failed ({type(err).__name__}: "
                          f"{err}); using the eager quantizer")
    return quantize_rows(x2)


# --------------------------------------------------------------------------------------------
# Swapping the modules of a RewardModel
# --------------------------------------------------------------------------------------------
@dataclass
class QuantReport:
    """What quantize_model did: the swapped module paths and the weight bytes before / after."""

    modules: list[str] = field(default_factory=list)
    bytes_before: int = 0  # the swapped Linear weights (biases are kept as they are)
    bytes_after: int = 0  # their FP8 weights + float32 scales

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        gib = 2**30
        return (f"fp8: {len(self.modules)} linear weights, {self.bytes_before / gib:.2f} GiB -> "
                f"{self.bytes_after / gib:.2f} GiB (saved {self.bytes_saved / gib:.2f} GiB)")


def resolve_fp8_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.lower() not in FP8_DTYPES:
            raise ValueError(f"quantize: unknown option {dtype!r}; supported: {', '.join(FP8_DTYPES)}")
        return FP8_DTYPES[dtype.lower()]
    if dtype != torch.float8_e4m3fn:
        raise ValueError(f"quantize: only torch.float8_e4m3fn weights are supported, got {dtype}")
    return dtype


@torch.no_grad()
def quantize_model(
    rm: nn.Module, dtype: torch.dtype | str = torch.float8_e4m3fn, fast_accum: bool = False
) -> QuantReport:
    """Replace the linear layers of every decoder block of `rm` (a RewardModel) by FP8Linear, in
    place, one module at a time (the device holds at most one float32 copy of one weight extra).
    dtype: torch.float8_e4m3fn or "fp8". Returns (and logs) a QuantReport."""
    dtype = resolve_fp8_dtype(dtype)
    report = QuantReport()
    for i, block in enumerate(rm.model.layers):
        quantize_block(block, i, dtype, fast_accum, report)
    logger.info("%s", report)
    return report


@torch.no_grad()
def quantize_block(block: nn.Module, index: int, dtype: torch.dtype, fast_accum: bool, report: QuantReport) -> None:
    """quantize_model for one decoder block (the loader calls it as soon as a block is loaded, so
    that a model never holds more than a block or two of linear weights in the compute dtype)."""
    swapped: dict[str, FP8Linear] = {}
    for path in FP8_TARGETS:
        parent_path, _, attr = path.rpartition(".")
        parent = block.get_submodule(parent_path)
        linear = getattr(parent, attr)
        if isinstance(linear, FP8Linear):
            continue  # already quantized
        if type(linear) is not nn.Linear:
            raise TypeError(f"quantize_model: model.layers.{index}.{path} is a {type(linear).__name__}, not nn.Linear")
        q = FP8Linear.from_linear(linear, dtype, fast_accum)
        report.modules.append(f"model.layers.{index}.{path}")
        report.bytes_before += linear.weight.numel() * linear.weight.element_size()
        report.bytes_after += q.weight_fp8.numel() * q.weight_fp8.element_size() + q.scale.numel() * 4
        setattr(parent, attr, q)
        swapped[path] = q
        del linear
    for group in _SHARED_INPUT:
        if all(p in swapped for p in group):
            cache = _InputCache()
            for k, p in enumerate(group):
                swapped[p]._cache = cache
                swapped[p]._cache_role = "first" if k == 0 else "last" if k == len(group) - 1 else "middle"


def quantized_modules(rm: nn.Module) -> list[str]:
    """Paths of the FP8Linear modules of a model (for checks and reports)."""
    return [name for name, m in rm.named_modules() if isinstance(m, FP8Linear)]
