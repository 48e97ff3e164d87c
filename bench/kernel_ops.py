"""Per-kernel benchmarks: every Triton kernel against its eager PyTorch reference, side by side, in one run.

    python bench/kernel_ops.py --json out.json      # on a GPU (the --quick sizes; well under 2.5 minutes)
    python bench/kernel_ops.py --cpu                # smoke mode: every code path at tiny sizes on the CPU
                                                 # (Triton kernels under TRITON_INTERPRET=1)

What is measured (GPU; bf16 unless said; the kernels are called from their modules, the baselines are
`themis_engine.kernels.reference` in eager PyTorch unless said):

* copy: a 1 GiB device-to-device `copy_` gives the card's measured copy bandwidth (read + write bytes);
  every memory-bound op is also reported as a fraction of it.
* attention, prefix-shared: one packed stream of T = 16384 tokens in groups of a 2048-token prefix and
  2 suffixes of 1024..2048 tokens (ARCHITECTURE.md section 3), Hq = 32, Hkv = 8 (GQA 4), D = 128.
  Ours vs FlexAttention (`torch.compile`d `flex_attention`, a BlockMask built from the same
  cu_seqlens / prefix_start / prefix_len through a mask_mod, `enable_gqa`) vs the reference.
* attention, dense causal: 4 segments of 4096 tokens (no prefix), same heads. Ours (varlen) vs
  `scaled_dot_product_attention` under `sdpa_kernel(FLASH_ATTENTION)` on [4, 32, 4096, 128]
  (is_causal, `enable_gqa`, or k/v repeated outside the timing if that backend refuses GQA)
  vs FlexAttention on the same mask vs the reference.
  Attention FLOPs count only the visible (query, key) pairs: per segment n*p + n(n+1)/2 (prefix p,
  segment n; causal = half); forward = 4*D*Hq*pairs (QK^T and PV), forward+backward = 3.5x that
  (the 5 backward matmuls; recomputation not counted). Every implementation is given the same count,
  so TFLOP/s ratios are time ratios.
* bt_loss: N = 4096 pairs, H = 5 criteria, D = 4096, mu = 0.01 centering, 80% of cells labelled, the
  normaliser passed in (no host sync in either side); ours vs the reference. GB/s from the minimum
  bytes (forward reads h_c, h_r; backward reads them again and writes dh_c, dh_r).
* linear_cross_entropy: T = 4096, V = 151936, D = 4096, 10% ignored labels, gradients for hidden and
  the LM head; ours vs the reference (float32 upcast, full logits) vs "eager bf16" (the usual
  unfused bf16 GEMM + float32 cross-entropy). FLOPs 2TVD (loss only, no grad) / 6TVD (forward +
  backward). Peak memory of one forward+backward, above the inputs.
* block ops at T = 16384 tokens (SwiGLU 8192): RMSNorm [T, 4096] (and with the fused residual add),
  RoPE and qk_norm_rope on q [T, 32, 128] at packed positions, SwiGLU on [T, 12288]. GB/s from the
  minimum bytes each pass must move; fraction of the measured copy bandwidth.

"fwd" is the forward of a training step (inputs require grad, grad mode on, the backward not run);
"fwd+bwd" is forward plus `torch.autograd.grad` (no .grad accumulation); linear CE's "fwd (no grad)"
is the loss alone under no_grad. Timing (GPU; bench/_harness.py, the harness of every bench script):
each call once for compilation, then warm-up, then repetitions (about --repeat-ms of work, at least
--min-reps, at most --max-reps) each timed with CUDA events after a 256 MiB memset that flushes L2
(so inputs never sit in L2 between repetitions); the median is reported. "err" is
max|x - x_ref| / max|x_ref| against the reference's output (fwd) or, the largest over the tensors,
its input gradients (fwd+bwd). Targets of the kernels issue are printed last, met / missed with the
ratio.

A time budget (--budget-s, 130 s) keeps the run inside the check script's limit: once spent, the
optional baselines (reference, FlexAttention, eager) are skipped and marked so; on SIGTERM the tables
collected so far are printed and written. `--cpu` timings are interpreter timings: meaningless, the mode
only checks that every path runs (FlexAttention runs eager and forward-only there: it has no CPU
backward).

Options go through themis_engine.config (`--key value`, `--key=value`, a flag alone for true,
`--config FILE.yaml`); `python bench/kernel_ops.py --help` lists them.
"""

import contextlib
import os
import random
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if "--cpu" in sys.argv[1:]:
    # the Triton interpreter must be chosen before triton (and so the kernel modules) is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BENCH = str(Path(__file__).resolve().parent)
if BENCH not in sys.path:  # bench/: the shared harness
    sys.path.insert(0, BENCH)
import _harness as harness  # noqa: E402

from themis_engine.config import ConfigError, option  # noqa: E402

PROG = "python bench/kernel_ops.py"
SECTIONS = ("copy", "attention", "bt_loss", "blocks", "linear_ce")


@dataclass
class KernelsConfig:
    """Every Triton kernel against its eager PyTorch reference, side by side."""

    cpu: bool = option(False, "smoke mode: tiny sizes on the CPU, Triton interpreter")
    quick: bool = option(True, "the default sizes and repeat counts (kept for old command lines; no effect)")
    full: bool = option(False, "more repetitions (about 4x the time per measurement)")
    json: Optional[str] = option(None, "write every number to this JSON file")
    only: list[str] = option(list(SECTIONS), "comma-separated subset of: " + ", ".join(SECTIONS))
    budget_s: float = option(130.0, "after this many seconds the optional baselines are skipped")
    repeat_ms: Optional[float] = option(None, "GPU time to spend repeating each measurement "
                                              "(default 50, --full 200; --cpu: one repetition)")
    min_reps: Optional[int] = option(None, "at least this many repetitions (default 3, --full 5, --cpu 1)")
    max_reps: Optional[int] = option(None, "at most this many repetitions (default 25, --full 100, --cpu 1)")
    no_flex: bool = option(False, "skip FlexAttention (its compile takes the longest)")

    def check(self) -> None:
        unknown = sorted(set(self.only) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"--only: unknown sections {unknown}; known: {', '.join(SECTIONS)}")
        for key in ("min_reps", "max_reps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")

TARGETS = {  # the kernels issue's GPU targets
    "attn_vs_flex": 1.2,  # fwd+bwd speed ratio over FlexAttention, prefix-shared mask
    "attn_vs_sdpa": 0.9,  # fwd+bwd TFLOP/s ratio over SDPA-flash, dense causal
    "bt_vs_eager": 3.0,  # fwd+bwd speed ratio over the eager reference
    "copy_fraction": 0.70,  # RMSNorm / RoPE / SwiGLU GB/s over the measured copy GB/s
}


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    dtype: torch.dtype
    attn_tokens: int
    attn_prefix: int
    attn_suffix: tuple[int, int]
    attn_k: int
    attn_dense: tuple[int, int]  # (segments, length)
    hq: int
    hkv: int
    head_dim: int
    flex_block: int
    bt: tuple[int, int, int]  # N, H, D
    lce: tuple[int, int, int]  # T, V, D
    norm: tuple[int, int]  # T, hidden
    rope: tuple[int, int, int]  # T, H, D
    swiglu: tuple[int, int]  # T, intermediate
    copy_bytes: int


GPU_SIZES = Sizes(
    dtype=torch.bfloat16, attn_tokens=16384, attn_prefix=2048, attn_suffix=(1024, 2048), attn_k=2,
    attn_dense=(4, 4096), hq=32, hkv=8, head_dim=128, flex_block=128,
    bt=(4096, 5, 4096), lce=(4096, 151936, 4096), norm=(16384, 4096), rope=(16384, 32, 128),
    swiglu=(8192, 12288), copy_bytes=1 << 30,
)
CPU_SIZES = Sizes(
    dtype=torch.float32, attn_tokens=96, attn_prefix=20, attn_suffix=(5, 17), attn_k=3,
    attn_dense=(2, 48), hq=4, hkv=1, head_dim=16, flex_block=16,
    bt=(19, 5, 48), lce=(24, 300, 32), norm=(24, 48), rope=(20, 3, 16), swiglu=(20, 40),
    copy_bytes=16 << 20,
)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
class Stopped(Exception):
    """SIGTERM (the check script's timeout): print and write what there is."""


_STOP = {"requested": False}  # set by the SIGTERM handler: code that wraps exceptions cannot hide it


class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()


# --------------------------------------------------------------------------------------------
# Rows and the run's state
# --------------------------------------------------------------------------------------------
@dataclass
class Impl:
    """One implementation of an op: fwd() -> raw output(s); fwdbwd() -> raw input gradients;
    views map raw results to the reference's layout (a tensor or a tuple of tensors) for the error."""

    name: str
    fwd: object = None
    fwdbwd: object = None
    fwd_view: object = None
    grad_view: object = None
    optional: bool = True  # skipped once the time budget is spent
    note: str = ""
    fwd_label: str = "fwd"
    peak: bool = False  # also measure the peak memory of one fwd+bwd


@dataclass
class Run:
    opt: KernelsConfig
    device: torch.device
    sizes: Sizes
    clock: Clock
    env: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)  # name -> {"title", "columns", "rows"}
    targets: list = field(default_factory=list)
    copy_gbps: float | None = None

    def time(self, fn) -> harness.Timing:
        """fn() timed by the harness with this run's repetition settings (one compile / warm-up call)."""
        o = self.opt
        return harness.benchmark(fn, self.device, warmup=1, repeats=o.min_reps, target_ms=o.repeat_ms,
                                 max_repeats=o.max_reps)


def _flat(x):
    if x is None:
        return None
    if torch.is_tensor(x):
        return [x]
    return [t for t in x if t is not None]


def rel_err(a, b) -> float | None:
    """The largest, over the tensors of a and b (matched in order), of max |a - b| / max |b|."""
    a, b = _flat(a), _flat(b)
    if not a or not b or len(a) != len(b):
        return None
    errs = [float((x.float() - y.float()).abs().max()) / max(float(y.float().abs().max()), 1e-30)
            for x, y in zip(a, b) if y.numel()]
    return max(errs) if errs else 0.0


def measure_op(run: Run, section: str, impls: list[Impl], *, flops: dict | None = None,
               nbytes: dict | None = None, ref_name: str = "reference") -> list[dict]:
    """Time every impl's passes; compute speed, speed-up over `ref_name`, error vs `ref_name`."""
    rows = []
    ref_out: dict = {}
    ref_ms: dict = {}
    # the reference first, so that the others' errors and speed-ups can be computed
    order = sorted(impls, key=lambda i: i.name != ref_name)
    for impl in order:
        passes = ((impl.fwd_label, impl.fwd, impl.fwd_view), ("fwd+bwd", impl.fwdbwd, impl.grad_view))
        for pass_name, fn, view in passes:
            if fn is None:
                continue
            key = "fwd+bwd" if pass_name == "fwd+bwd" else "fwd"
            row = {"section": section, "impl": impl.name, "pass": pass_name, "ms": None, "note": impl.note}
            rows.append(row)
            if impl.optional and run.clock.left() < 0:
                row["note"] = _join(row["note"], "skipped: time budget spent")
                continue
            try:
                with torch.no_grad() if pass_name == "fwd (no grad)" else contextlib.nullcontext():
                    out = fn()
                    result = _detach((view or (lambda r: r))(out))
                    del out
                    t = run.time(fn)
                row.update(ms=t.median_ms, reps=t.reps)
                if impl.name == ref_name:
                    ref_out[key], ref_ms[key] = result, t.median_ms
                    row["err"] = 0.0 if result is not None else None
                elif key in ref_out:
                    row["err"] = rel_err(result, ref_out[key])
                del result
                if impl.peak and pass_name == "fwd+bwd":
                    row["peak_gib"] = harness.peak_extra_gib(fn, run.device)
            except Stopped:
                raise
            except Exception as err:  # an OOM, or a baseline the installed torch lacks: note it, go on
                if _STOP["requested"]:
                    raise Stopped() from err
                first_line = (str(err).splitlines() or [""])[0][:120]
                if not impl.optional:
                    # our kernel failed: keep the section's other rows (the baselines), fail the run
                    run.env.setdefault("errors", []).append(f"{section}/{impl.name}/{pass_name}: "
                                                            f"{type(err).__name__}: {first_line}")
                row["note"] = _join(row["note"], f"failed: {type(err).__name__}: {first_line}")
                if run.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if flops and key in flops:
                row["tflops"] = flops[key] / (row["ms"] * 1e-3) / 1e12
            if nbytes and key in nbytes:
                row["gbps"] = nbytes[key] / (row["ms"] * 1e-3) / 1e9
                if run.copy_gbps:
                    row["copy_frac"] = row["gbps"] / run.copy_gbps
            if key in ref_ms and impl.name != ref_name:
                row["x_ref"] = ref_ms[key] / row["ms"]
    # present in the caller's order
    rank = {i.name: n for n, i in enumerate(impls)}
    rows.sort(key=lambda r: (rank[r["impl"]], r["pass"] == "fwd+bwd"))
    return rows


def _detach(x):
    if x is None:
        return None
    if torch.is_tensor(x):
        return x.detach()
    return tuple(t.detach() if torch.is_tensor(t) else t for t in x)


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _ms(row, impl, pass_name):
    for r in row:
        if r["impl"] == impl and r["pass"] == pass_name and r.get("ms"):
            return r
    return None


def add_section(run: Run, name: str, title: str, rows: list[dict], columns: list[str]):
    run.sections[name] = {"title": title, "columns": columns, "rows": rows}
    write_json(run)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def section_copy(run: Run):
    n = run.sizes.copy_bytes
    src = torch.empty(n, dtype=torch.uint8, device=run.device).random_(0, 255)
    dst = torch.empty_like(src)
    t = run.time(lambda: dst.copy_(src))
    gbps = 2 * n / t.median_s / 1e9
    run.copy_gbps = gbps
    rows = [{"section": "copy", "impl": "torch copy_", "pass": f"{n / 2**30:.3g} GiB d2d", "ms": t.median_ms,
             "reps": t.reps, "gbps": gbps, "copy_frac": 1.0, "note": "read + write bytes"}]
    add_section(run, "copy", "device-to-device copy (the bandwidth yardstick)", rows,
                ["impl", "pass", "ms", "gbps", "note"])
    src = dst = None  # 2 x copy_bytes back before the next section


def prefix_workload(total: int, prefix: int, suffix: tuple[int, int], k: int, seed: int = 0):
    """Segments (start, length, prefix_start, prefix_len) of a packed stream of exactly `total` tokens:
    groups of a `prefix`-token prefix and k suffixes of suffix[0]..suffix[1] tokens; the tail that
    does not fit a whole group becomes one smaller group (or a plain segment)."""
    rng = random.Random(seed)
    segs, cursor = [], 0

    def group(p, sufs):
        nonlocal cursor
        start = cursor
        if p:
            segs.append((cursor, p, 0, 0))
            cursor += p
        for s in sufs:
            segs.append((cursor, s, start if p else 0, p))
            cursor += s

    while True:
        sufs = [rng.randint(*suffix) for _ in range(k)]
        if cursor + prefix + sum(sufs) > total:
            break
        group(prefix, sufs)
    rest = total - cursor
    if rest >= k + 1:
        p = max(1, min(prefix, rest // (k + 1)))
        each, extra = divmod(rest - p, k)
        group(p, [each + (1 if i < extra else 0) for i in range(k)])
    elif rest > 0:
        group(0, [rest])
    assert cursor == total
    return segs


def dense_workload(batch: int, length: int):
    return [(i * length, length, 0, 0) for i in range(batch)]


def visible_pairs(segs) -> int:
    return sum(n * p + n * (n + 1) // 2 for _, n, _, p in segs)


def _meta(segs, device):
    cu = torch.tensor([s for s, _, _, _ in segs] + [segs[-1][0] + segs[-1][1]], dtype=torch.int32, device=device)
    ps = torch.tensor([p for _, _, p, _ in segs], dtype=torch.int32, device=device)
    pl = torch.tensor([n for _, _, _, n in segs], dtype=torch.int32, device=device)
    return cu, ps, pl, max(n for _, n, _, _ in segs)


class FlexState:
    """The compiled flex_attention and ONE mask_mod over per-token tensors that are refilled for each
    workload (same tensor objects, same T), so a second workload of the same length reuses the
    compiled kernels instead of recompiling."""

    def __init__(self, run: Run, T: int):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.create_block_mask = create_block_mask
        self.fn = torch.compile(flex_attention, dynamic=False) if run.device.type == "cuda" else flex_attention
        self.T = T
        self.seg = torch.zeros(T, dtype=torch.int32, device=run.device)
        self.lo = torch.zeros(T, dtype=torch.int32, device=run.device)
        self.hi = torch.zeros(T, dtype=torch.int32, device=run.device)
        seg, lo, hi = self.seg, self.lo, self.hi

        def mask_mod(b, h, q_idx, kv_idx):
            causal_same = (seg[q_idx] == seg[kv_idx]) & (kv_idx <= q_idx)
            in_prefix = (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])
            return causal_same | in_prefix

        self.mask_mod = mask_mod

    def block_mask(self, segs, device, block: int):
        assert segs[-1][0] + segs[-1][1] == self.T
        seg = torch.empty(self.T, dtype=torch.int32)
        lo = torch.zeros(self.T, dtype=torch.int32)
        hi = torch.zeros(self.T, dtype=torch.int32)
        for i, (s, n, p0, p) in enumerate(segs):
            seg[s : s + n] = i
            lo[s : s + n] = p0
            hi[s : s + n] = p0 + p
        self.seg.copy_(seg)
        self.lo.copy_(lo)
        self.hi.copy_(hi)
        t0 = time.perf_counter()
        bm = self.create_block_mask(self.mask_mod, None, None, self.T, self.T, device=device, BLOCK_SIZE=block)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return bm, (time.perf_counter() - t0) * 1e3


def attention_impls(run: Run, segs, flex: FlexState | None, dense: tuple[int, int] | None):
    """Implementations of attention on the workload `segs` (dense: also SDPA-flash on [B, H, L, D])."""
    from themis_engine.kernels import attention_kernel, reference

    sz, dev = run.sizes, run.device
    T = segs[-1][0] + segs[-1][1]
    cu, ps, pl, max_seqlen = _meta(segs, dev)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, sz.dtype)

    q, k, v = rnd(T, sz.hq, sz.head_dim), rnd(T, sz.hkv, sz.head_dim), rnd(T, sz.hkv, sz.head_dim)
    do = rnd(T, sz.hq, sz.head_dim)
    for t in (q, k, v):
        t.requires_grad_(True)
    scale = sz.head_dim**-0.5
    group = sz.hq // sz.hkv

    def ours():
        return attention_kernel.attention(q, k, v, cu, ps, pl, max_seqlen, scale)[0]

    def ref():
        return reference.attention(q, k, v, cu, ps, pl, max_seqlen, scale)[0]

    def grads(f, ins, dout):
        return lambda: torch.autograd.grad(f(), ins, dout)

    impls = [
        Impl("themis (triton)", ours, grads(ours, (q, k, v), do), optional=False),
    ]
    if dense is not None:
        B, L = dense

        def to4(x):  # the stream [T, H, D] is [B, L, H, D]: SDPA reads it as [B, H, L, D] (a view)
            return x.view(B, L, x.shape[1], x.shape[2]).transpose(1, 2)

        def from4(x):
            return x.transpose(1, 2).reshape(T, x.shape[1], x.shape[3])

        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_gqa():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(to4(q), to4(k), to4(v), is_causal=True, scale=scale,
                                                      enable_gqa=True)

        note = "flash backend, enable_gqa"
        sdpa, sdpa_in = sdpa_gqa, (q, k, v)
        try:
            with torch.no_grad():
                sdpa_gqa()
        except Exception:
            # the flash backend of this torch refuses GQA: repeat k/v outside the timed region
            kr = k.detach().repeat_interleave(group, dim=1).requires_grad_(True)
            vr = v.detach().repeat_interleave(group, dim=1).requires_grad_(True)

            def sdpa_rep():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(to4(q), to4(kr), to4(vr), is_causal=True, scale=scale)

            note = "flash backend, k/v repeated for GQA (untimed); grads of repeated k/v"
            sdpa, sdpa_in = sdpa_rep, (q, kr, vr)
        do4 = to4(do)
        impls.append(Impl("SDPA flash", sdpa, grads(sdpa, sdpa_in, do4), fwd_view=from4,
                          grad_view=(lambda gr: (gr[0], gr[1], gr[2])) if sdpa_in[1] is k else (lambda gr: None),
                          note=note))
    if flex is not None:
        bm, build_ms = flex.block_mask(segs, dev, sz.flex_block)
        # flex reads [B, H, T, D]: give it its own contiguous copies of the same values
        cpu = dev.type != "cuda"  # flex has no CPU backward, and refuses CPU inputs that require grad
        qf, kf, vf = (x.detach().transpose(0, 1).contiguous()[None].requires_grad_(not cpu) for x in (q, k, v))
        dof = do.transpose(0, 1).contiguous()[None]

        def flex_fn():
            return flex.fn(qf, kf, vf, block_mask=bm, scale=scale, enable_gqa=True)

        def back(x):
            return x[0].transpose(0, 1)

        impls.append(Impl(
            "FlexAttention", flex_fn, None if cpu else grads(flex_fn, (qf, kf, vf), dof), fwd_view=back,
            grad_view=lambda gr: tuple(back(x) for x in gr),
            note=f"torch.compile; block mask {build_ms:.0f} ms to build (untimed)" if not cpu
            else "eager, forward only (no CPU backward)",
        ))
    impls.append(Impl("reference", ref, grads(ref, (q, k, v), do)))
    pairs = visible_pairs(segs)
    fwd = 4.0 * sz.head_dim * sz.hq * pairs
    return impls, {"fwd": fwd, "fwd+bwd": 3.5 * fwd}, pairs


def section_attention(run: Run):
    sz = run.sizes
    cols = ["impl", "pass", "ms", "tflops", "x_ref", "err", "note"]
    if run.opt.no_flex:
        flex = None
    else:
        try:
            flex = FlexState(run, sz.attn_tokens)
        except Exception as err:  # an old torch with no flex_attention
            print(f"FlexAttention unavailable: {err}", file=sys.stderr)
            flex = None

    segs = prefix_workload(sz.attn_tokens, sz.attn_prefix, sz.attn_suffix, sz.attn_k)
    impls, flops, pairs = attention_impls(run, segs, flex, None)
    n_groups = sum(1 for s in segs if s[3] == 0)
    title = (f"attention, prefix-shared: T={sz.attn_tokens}, {n_groups} groups of a {sz.attn_prefix}-token prefix "
             f"+ {sz.attn_k} suffixes of {sz.attn_suffix[0]}-{sz.attn_suffix[1]}, Hq={sz.hq} Hkv={sz.hkv} "
             f"D={sz.head_dim} {str(sz.dtype).replace('torch.', '')}; {pairs / 1e6:.1f}M visible pairs")
    rows = measure_op(run, "attention_prefix", impls, flops=flops)
    for r in rows:
        r["visible_pairs"] = pairs
    add_section(run, "attention_prefix", title, rows, cols)
    del impls

    B, L = sz.attn_dense
    segs = dense_workload(B, L)
    if flex is not None and B * L != flex.T:
        flex = None  # only reuse the compiled flex at the same length
    impls, flops, pairs = attention_impls(run, segs, flex, (B, L))
    title = (f"attention, dense causal: {B} x {L} tokens, Hq={sz.hq} Hkv={sz.hkv} D={sz.head_dim} "
             f"{str(sz.dtype).replace('torch.', '')}; {pairs / 1e6:.1f}M visible pairs (causal = half)")
    rows = measure_op(run, "attention_dense", impls, flops=flops)
    for r in rows:
        r["visible_pairs"] = pairs
    add_section(run, "attention_dense", title, rows, cols)


def section_bt(run: Run):
    from themis_engine.kernels import bt_loss_kernel, reference

    N, H, D = run.sizes.bt
    dev, dt = run.device, run.sizes.dtype
    g = torch.Generator().manual_seed(1)
    hc = (torch.randn(N, D, generator=g)).to(dev, dt).requires_grad_(True)
    hr = (torch.randn(N, D, generator=g)).to(dev, dt).requires_grad_(True)
    w = (torch.randn(H, D, generator=g) * D**-0.5).to(dev, dt).requires_grad_(True)
    mask = (torch.rand(N, H, generator=g) < 0.8).to(dev)
    norm = float(mask.sum())
    kw = dict(mu=0.01, magnitude="centering", normalizer=norm)

    def make(f):
        def fwd():
            out = f(hc, hr, w, mask, None, **kw)
            return out.loss

        def fb():
            return torch.autograd.grad(fwd(), (hc, hr, w))

        return fwd, fb

    impls = [Impl("themis (triton)", *make(bt_loss_kernel.bt_loss), optional=False),
             Impl("reference", *make(reference.bt_loss))]
    e = torch.finfo(dt).bits // 8
    nbytes = {"fwd": 2 * N * D * e + H * D * e, "fwd+bwd": 6 * N * D * e + 3 * H * D * e}
    rows = measure_op(run, "bt_loss", impls, nbytes=nbytes)
    title = f"bt_loss: N={N} pairs, H={H}, D={D} {str(dt).replace('torch.', '')}, mu=0.01 centering"
    add_section(run, "bt_loss", title, rows, ["impl", "pass", "ms", "gbps", "copy_frac", "x_ref", "err", "note"])


def section_lce(run: Run):
    from themis_engine.kernels import linear_ce_kernel, reference

    T, V, D = run.sizes.lce
    dev, dt = run.device, run.sizes.dtype
    g = torch.Generator().manual_seed(2)
    h = (torch.randn(T, D, generator=g)).to(dev, dt).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * D**-0.5).to(dev, dt).requires_grad_(True)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.1] = -100
    labels = labels.to(dev)
    chunk_bytes = linear_ce_kernel.CHUNK_BYTES
    if dev.type != "cuda":  # make the smoke run take the multi-chunk path (restored below)
        linear_ce_kernel.CHUNK_BYTES = 7 * V * 4
    try:
        _lce_measure(run, linear_ce_kernel, reference, h, w, labels, T, V, D, dt)
    finally:
        linear_ce_kernel.CHUNK_BYTES = chunk_bytes


def _lce_measure(run, linear_ce_kernel, reference, h, w, labels, T, V, D, dt):
    """Ours vs the float32 reference vs the usual unfused bf16 path; peak memory of each fwd+bwd."""

    def eager_bf16(h, w, labels):
        return F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100)

    def make(f):
        def fwd():
            return f(h, w, labels)

        def fb():
            return torch.autograd.grad(fwd(), (h, w))

        return fwd, fb

    impls = [
        Impl("themis (triton)", *make(linear_ce_kernel.linear_cross_entropy), optional=False,
             fwd_label="fwd (no grad)", peak=True, note="chunked: logits never whole"),
        Impl("reference", *make(reference.linear_cross_entropy), fwd_label="fwd (no grad)", peak=True,
             note="float32 upcast, full logits"),
        Impl("eager bf16", *make(eager_bf16), fwd_label="fwd (no grad)", peak=True,
             note="bf16 GEMM, full logits, fp32 CE" if dt != torch.float32 else "fp32"),
    ]
    flops = {"fwd": 2.0 * T * V * D, "fwd+bwd": 6.0 * T * V * D}
    rows = measure_op(run, "linear_ce", impls, flops=flops)
    add_section(run, "linear_ce", f"linear cross-entropy: T={T}, V={V}, D={D} {str(dt).replace('torch.', '')}",
                rows, ["impl", "pass", "ms", "tflops", "peak_gib", "x_ref", "err", "note"])


def section_blocks(run: Run):
    from themis_engine.kernels import reference, rmsnorm_kernel, rope_kernel, swiglu_kernel

    dev, dt = run.device, run.sizes.dtype
    e = torch.finfo(dt).bits // 8
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dev, dt)

    cols = ["impl", "pass", "ms", "gbps", "copy_frac", "x_ref", "err", "note"]

    def run_op(name, title, kern, ref, inputs, grad_inputs, nbytes, n_outputs=1):
        douts = None

        def make(f):
            def fwd():
                return f(*inputs)

            def fb():
                out = fwd()
                outs = (out,) if n_outputs == 1 else tuple(out)
                return torch.autograd.grad(outs, grad_inputs, douts)

            return fwd, fb

        with torch.no_grad():
            out = ref(*inputs)
        outs = (out,) if n_outputs == 1 else tuple(out)
        douts = tuple(torch.randn(o.shape, generator=g).to(dev, o.dtype) for o in outs)
        impls = [Impl("themis (triton)", *make(kern), optional=False), Impl("reference", *make(ref))]
        rows = measure_op(run, name, impls, nbytes=nbytes)
        for r in rows:
            r["op"] = name
        run.sections[name] = {"title": title, "columns": cols, "rows": rows}

    # RMSNorm [T, hidden], weight in the model dtype
    T, Dm = run.sizes.norm
    x, r = rnd(T, Dm).requires_grad_(True), rnd(T, Dm).requires_grad_(True)
    w = (1 + rnd(Dm, s=0.1)).requires_grad_(True)
    eps = 1e-6
    run_op("rms_norm", f"rms_norm: [{T}, {Dm}]",
           lambda x, w: rmsnorm_kernel.rms_norm(x, w, eps), lambda x, w: reference.rms_norm(x, w, eps),
           (x, w), (x, w), {"fwd": 2 * T * Dm * e, "fwd+bwd": 5 * T * Dm * e})
    run_op("rms_norm_residual", f"rms_norm + residual add: [{T}, {Dm}]",
           lambda x, r, w: rmsnorm_kernel.rms_norm(x, w, eps, r), lambda x, r, w: reference.rms_norm(x, w, eps, r),
           (x, r, w), (x, r, w), {"fwd": 4 * T * Dm * e, "fwd+bwd": 8 * T * Dm * e}, n_outputs=2)
    del x, r, w

    # RoPE / qk_norm_rope on q [T, H, D] at packed positions (a prefix-shared layout's positions)
    T, H, D = run.sizes.rope
    segs = prefix_workload(T, max(1, T // 8), (max(1, T // 16), max(1, T // 8)), 2, seed=3)
    pos = torch.cat([torch.arange(p, p + n) for _, n, _, p in segs]).to(dev)
    inv_freq = (1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))).to(dev)
    xq = rnd(T, H, D).requires_grad_(True)
    nw = (1 + rnd(D, s=0.1)).requires_grad_(True)
    side = 8 * T  # int64 position ids
    run_op("rope", f"rope: q [{T}, {H}, {D}] at packed positions",
           lambda x: rope_kernel.rope(x, pos, inv_freq), lambda x: reference.rope(x, pos, inv_freq),
           (xq,), (xq,), {"fwd": 2 * T * H * D * e + side, "fwd+bwd": 4 * T * H * D * e + 2 * side})
    run_op("qk_norm_rope", f"qk_norm_rope: q [{T}, {H}, {D}] (per-head RMSNorm + RoPE)",
           lambda x, w: rope_kernel.qk_norm_rope(x, w, eps, pos, inv_freq),
           lambda x, w: reference.qk_norm_rope(x, w, eps, pos, inv_freq),
           (xq, nw), (xq, nw), {"fwd": 2 * T * H * D * e + 4 * T * H + side,
                                "fwd+bwd": 5 * T * H * D * e + 8 * T * H + 2 * side})
    del xq, nw

    T, I = run.sizes.swiglu
    gate, up = rnd(T, I).requires_grad_(True), rnd(T, I).requires_grad_(True)
    run_op("swiglu", f"swiglu: [{T}, {I}]", swiglu_kernel.swiglu, reference.swiglu, (gate, up), (gate, up),
           {"fwd": 3 * T * I * e, "fwd+bwd": 8 * T * I * e})
    del gate, up
    write_json(run)


# --------------------------------------------------------------------------------------------
# Targets, tables, JSON
# --------------------------------------------------------------------------------------------
def _rows(run, section):
    return run.sections.get(section, {}).get("rows", [])


def compute_targets(run: Run):
    smoke = run.device.type != "cuda"
    out = []

    def add(name, value, need, unit, reason=""):
        if value is None:
            status = f"not measured{': ' + reason if reason else ''}"
        elif smoke:
            status = "smoke (cpu): not judged"
        else:
            status = "met" if value >= need else f"MISSED by {(1 - value / need):.0%}"
        out.append({"target": name, "measured": value, "required": need, "unit": unit, "status": status})

    def why(section, impls, pass_name="fwd+bwd"):
        rows = _rows(run, section)
        if not rows:
            return "section did not run"
        for impl in impls:
            mine = [r for r in rows if r["impl"] == impl]
            row = next((r for r in mine if r["pass"] == pass_name), None)
            if row is None:
                extra = f" ({mine[0]['note']})" if mine and mine[0].get("note") else ""
                return f"{impl} has no {pass_name} run{extra}"
            if not row.get("ms"):
                return f"{impl}: {row.get('note') or 'no time'}"
        return "no measurement"

    def ratio(section, a, b, pass_name="fwd+bwd"):
        ra, rb = _ms(_rows(run, section), a, pass_name), _ms(_rows(run, section), b, pass_name)
        if ra is None or rb is None:
            return None, why(section, (a, b), pass_name)
        return rb["ms"] / ra["ms"], ""

    add("attention fwd+bwd vs FlexAttention, prefix-shared mask (speed)",
        *_swap(ratio("attention_prefix", "themis (triton)", "FlexAttention"), TARGETS["attn_vs_flex"]))
    # the same FLOP count on both sides: the TFLOP/s ratio is the time ratio
    add("attention fwd+bwd TFLOP/s vs SDPA-flash, dense causal 4k, D=128",
        *_swap(ratio("attention_dense", "themis (triton)", "SDPA flash"), TARGETS["attn_vs_sdpa"]))
    add("bt_loss fwd+bwd vs eager reference (speed)",
        *_swap(ratio("bt_loss", "themis (triton)", "reference"), TARGETS["bt_vs_eager"]))
    for op in ("rms_norm", "rms_norm_residual", "rope", "qk_norm_rope", "swiglu"):
        for p in ("fwd", "fwd+bwd"):
            row = _ms(_rows(run, op), "themis (triton)", p)
            frac = row.get("copy_frac") if row else None
            add(f"{op} {p} GB/s vs copy", frac, TARGETS["copy_fraction"], "frac",
                "" if frac is not None else ("no copy bandwidth" if row else why(op, ("themis (triton)",), p)))
    run.targets = out


def _swap(pair, need):
    """(value, reason), need -> the add() arguments (value, need, "x", reason)."""
    return pair[0], need, "x", pair[1]


def _fmt(col, v):
    if v is None or v == "":
        return ""
    if isinstance(v, str):
        return v
    if col == "ms":
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    if col in ("copy_frac",):
        return f"{v:.0%}"
    if col == "x_ref":
        return f"{v:.2f}x"
    if col == "err":
        return f"{v:.1e}"
    if col == "peak_gib":
        return f"{v:.2f}"
    if col in ("tflops",):
        return f"{v:.1f}" if v >= 1 else f"{v:.3g}"
    if col == "gbps":
        return f"{v:.0f}" if v >= 10 else f"{v:.3g}"
    return str(v)


HEADERS = {"impl": "impl", "pass": "pass", "ms": "median ms", "tflops": "TFLOP/s", "gbps": "GB/s",
           "copy_frac": "of copy BW", "x_ref": "speed-up vs reference", "err": "err vs ref",
           "peak_gib": "peak GiB", "note": "note"}


def _table(columns: list[str], rows: list[dict], first: list[str] = ()) -> str:
    heads = [HEADERS.get(c, c) for c in (*first, *columns)]
    return harness.markdown_table(heads, [[_fmt(c, r.get(c)) for c in (*first, *columns)] for r in rows])


def print_tables(run: Run):
    print()
    print(harness.header("kernel benchmarks", run.env, f"{run.clock.elapsed():.0f} s"))
    if run.device.type != "cuda":
        print("(--cpu smoke mode: Triton interpreter, tiny sizes; timings are meaningless)")
    blocks = ("rms_norm", "rms_norm_residual", "rope", "qk_norm_rope", "swiglu")
    order = ["copy", "attention_prefix", "attention_dense", "bt_loss", "linear_ce"]
    for name in order:
        sec = run.sections.get(name)
        if not sec:
            continue
        print()
        print(f"### {sec['title']}")
        print(_table(sec["columns"], sec["rows"]))
    present = [b for b in blocks if b in run.sections]
    block_rows = [r for b in present for r in _rows(run, b)]
    if block_rows:
        print()
        print("### block ops: " + "; ".join(run.sections[b]["title"] for b in present))
        print(_table(run.sections[present[0]]["columns"], block_rows, first=["op"]))
    print()
    copy = f"{_fmt('gbps', run.copy_gbps)} GB/s" if run.copy_gbps else "not measured"
    print(f"### targets of the kernels issue (copy bandwidth {copy})")
    rows = []
    for t in run.targets:
        if t["unit"] == "frac":
            m = "" if t["measured"] is None else f"{t['measured']:.0%}"
            need = f">= {t['required']:.0%}"
        else:
            m = "" if t["measured"] is None else f"{t['measured']:.2f}x"
            need = f">= {t['required']:.1f}x"
        rows.append([t["target"], m, need, t["status"]])
    print(harness.markdown_table(["target", "measured", "required", "status"], rows))


def write_json(run: Run):
    """Every number so far to --json (rewritten after each section, so a run cut off keeps them)."""
    harness.write_json(run.opt.json, {
        "env": run.env,
        "sizes": vars(run.sizes),
        "copy_gbps": run.copy_gbps,
        "sections": run.sections,
        "targets": run.targets,
        "elapsed_s": run.clock.elapsed(),
        "timing": {"repeat_ms": run.opt.repeat_ms, "min_reps": run.opt.min_reps, "max_reps": run.opt.max_reps,
                   "statistic": "median", "l2_flush": run.device.type == "cuda"},
    })


def environment(device: torch.device, argv) -> dict:
    """The harness's environment header, plus which implementation each op dispatches to here."""
    from themis_engine import kernels

    env = harness.environment(device, "kernel_ops.py", argv)
    probe = torch.empty(1, device=device)
    env["dispatch"] = {op: kernels.backend_for(op, probe) for op in kernels.KERNEL_MODULES}
    return env


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> KernelsConfig:
    """The config from the command line, with the repetition defaults of the mode filled in."""
    opt = harness.parse(KernelsConfig, argv, prog=PROG, description=__doc__)
    if opt.cpu:
        opt.repeat_ms = opt.repeat_ms or 0.0
        opt.min_reps = opt.min_reps or 1
        opt.max_reps = opt.max_reps or 1
    else:
        opt.repeat_ms = opt.repeat_ms or (200.0 if opt.full else 50.0)
        opt.min_reps = opt.min_reps or (5 if opt.full else 3)
        opt.max_reps = opt.max_reps or (100 if opt.full else 25)
    return opt


def main(argv=None) -> dict:
    opt = parse_args(argv)
    if opt.cpu:
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "triton" in sys.modules:
                sys.exit("--cpu needs TRITON_INTERPRET=1 before triton is imported; run it as a script "
                         "or set the variable first")
            os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        sizes = CPU_SIZES
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.attention")
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: run with --cpu for the smoke mode")
        device = torch.device("cuda")
        sizes = GPU_SIZES
    torch.manual_seed(0)
    clock = Clock(opt.budget_s)
    run = Run(opt=opt, device=device, sizes=sizes, clock=clock)
    run.env = environment(device, argv)
    only = opt.only

    def on_term(signum, frame):
        _STOP["requested"] = True
        raise Stopped()

    old = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    errors: list = []
    run.env["errors"] = errors
    try:
        if "copy" in only or any(s in only for s in ("bt_loss", "blocks")):
            section_copy(run)
        # the quick sections first, so that FlexAttention's compile cannot starve their baselines of time
        for name, fn in (("bt_loss", lambda: section_bt(run)), ("blocks", lambda: section_blocks(run)),
                         ("attention", lambda: section_attention(run)), ("linear_ce", lambda: section_lce(run))):
            if name in only:
                t0 = clock.elapsed()
                try:
                    fn()
                except Stopped:
                    raise
                except Exception as err:  # one broken op must not hide the others' numbers
                    if _STOP["requested"]:
                        raise Stopped() from err
                    traceback.print_exc()
                    errors.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
                print(f"[{name}: {clock.elapsed() - t0:.1f} s]", file=sys.stderr, flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except Stopped:
        print("stopped by SIGTERM: tables so far", file=sys.stderr)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        compute_targets(run)
        print_tables(run)
        write_json(run)
        if errors:
            print("ERRORS: " + " | ".join(errors))
    return {"env": run.env, "copy_gbps": run.copy_gbps, "sections": run.sections, "targets": run.targets}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(1 if main()["env"]["errors"] else 0)
