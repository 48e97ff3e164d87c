"""Compile every Triton kernel for a GPU architecture without a GPU: the launches a model of a given
shape makes, captured from the real launchers, each compiled ahead of time down to a cubin.

    python -m themis_engine.kernels.compile_check                          # sm_90, qwen3-0.6b/8b/32b shapes
    python -m themis_engine.kernels.compile_check --arch 80 --models qwen3-8b --dtypes bfloat16

How: Triton's `JITFunction.run` is replaced by a recorder, and each op's public Triton function
(`themis_engine.kernels._kernel(op)`) runs forward and backward on small CPU tensors with the
model's dimensions (hidden size, heads, head dim, intermediate size, vocabulary), so that every
launcher computes its grid, strides, block sizes, warps and stages as it would on a card. Each
distinct launch (kernel, argument types, compile-time constants, warps, stages) is then compiled
with `triton.compile` for `GPUTarget("cuda", arch, 32)`: Triton's passes, LLVM, and the bundled
ptxas. What this catches on a CPU-only machine: compile errors the interpreter does not see
(operand types of tl.dot, layouts, unsupported ops), shared-memory use over the card's limit, and
register spills (reported). What it does not catch: wrong results (only a GPU run shows those) and
differences between this Triton version and the GPU machine's.

Outputs on the tiny CPU tensors are meaningless (nothing runs); only the launches matter.
Needs a Triton with its NVIDIA backend (the default wheels) and TRITON_INTERPRET unset (the module
re-executes itself without it).
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "themis_engine.kernels.compile_check", *sys.argv[1:]], env)

import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}  # bytes per block (opt-in)
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


@dataclass
class Launch:
    kernel: object  # the JITFunction
    signature: dict  # parameter name -> Triton type string ("constexpr" for constants)
    constants: dict  # parameter name -> value
    attrs: dict  # {(index,): [["tt.divisibility", 16]]} as the runtime specializes
    num_warps: int
    num_stages: int
    where: set = field(default_factory=set)  # which op / model / dtype made it

    def key(self):
        return (self.kernel.__name__, tuple(self.signature.items()), tuple(sorted(self.constants.items())),
                tuple(sorted(self.attrs)), self.num_warps, self.num_stages)


def _arg_type(value) -> tuple[str, bool]:
    """(Triton type, divisible by 16) of a runtime argument."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TYPES:
            raise TypeError(f"no Triton pointer type for {value.dtype}")
        return "*" + _TYPES[value.dtype], True  # device allocations are 256-byte aligned
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0 and value != 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


class Recorder:
    """Replaces JITFunction.run; records each launch instead of running it."""

    def __init__(self):
        self.launches: dict = {}
        self.context = ""

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self._orig = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.record(fn, args, kwargs)

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction

        JITFunction.run = self._orig

    def record(self, fn, args, kwargs):
        num_warps = kwargs.pop("num_warps", 4)
        num_stages = kwargs.pop("num_stages", 3)
        for k in ("num_ctas", "maxnreg", "enable_fp_fusion"):
            kwargs.pop(k, None)
        bound = dict(zip([p.name for p in fn.params], args))
        bound.update(kwargs)
        signature, constants, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            if p.name not in bound:
                if p.has_default:
                    value = p.default
                else:
                    raise TypeError(f"{fn.__name__}: no value for {p.name}")
            else:
                value = bound[p.name]
            if p.is_constexpr or value is None:
                signature[p.name] = "constexpr"
                constants[p.name] = value
                continue
            ty, div16 = _arg_type(value)
            signature[p.name] = ty
            if div16 and i not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        launch = Launch(fn, signature, constants, attrs, num_warps, num_stages)
        launch = self.launches.setdefault(launch.key(), launch)
        launch.where.add(self.context)


# ------------------------------------------------------------------------------------ workloads
def _model_dims(name: str):
    from themis_engine.model.args import ModelArgs

    return ModelArgs.from_name(name)


def exercise(op: str, args, dtype: torch.dtype, T: int = 40) -> None:
    """Run `op`'s Triton function forward and backward on CPU tensors of `args`' dimensions."""
    from themis_engine import kernels

    fn = kernels._kernel(op)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=dtype, grad=True):
        return torch.randn(*shape, generator=g).to(dt).requires_grad_(grad)

    D, Hq, Hkv, hidden = args.head_dim, args.num_heads, args.num_kv_heads, args.hidden_size
    pos = torch.arange(T, dtype=torch.int64)
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    if op == "attention":
        # a prefix of 12 rows seen by two suffixes (10, 8 rows), and a plain segment of 10
        cu = torch.tensor([0, 12, 22, 30, T], dtype=torch.int32)
        ps = torch.tensor([0, 0, 0, 0], dtype=torch.int32)
        pl = torch.tensor([0, 12, 12, 0], dtype=torch.int32)
        q, k, v = rnd(T, Hq, D), rnd(T, Hkv, D), rnd(T, Hkv, D)
        out = fn(q, k, v, cu, ps, pl, 12, D**-0.5)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().sum(), (q, k, v))
    elif op == "rms_norm":
        x, w, res = rnd(T, hidden), rnd(hidden), rnd(T, hidden)
        y = fn(x, w, 1e-6)
        torch.autograd.grad(y.float().sum(), (x, w))
        y, h = fn(x, w, 1e-6, res)
        torch.autograd.grad((y.float().sum() + h.float().sum()), (x, w, res))
        # the final norm and Qwen3's q/k norms have other widths
        xd, wd = rnd(T, D), rnd(D)
        torch.autograd.grad(fn(xd, wd, 1e-6).float().sum(), (xd, wd))
    elif op == "rope":
        for H in sorted({Hq, Hkv}):
            x = rnd(T, H, D)
            torch.autograd.grad(fn(x, pos, inv_freq).float().sum(), (x,))
    elif op == "qk_norm_rope":
        for H in sorted({Hq, Hkv}):
            x, w = rnd(T, H, D), rnd(D)
            torch.autograd.grad(fn(x, w, 1e-6, pos, inv_freq).float().sum(), (x, w))
    elif op == "swiglu":
        gate, up = rnd(T, args.intermediate_size), rnd(T, args.intermediate_size)
        torch.autograd.grad(fn(gate, up).float().sum(), (gate, up))
    elif op == "bt_loss":
        H = len(args.criteria) or 5
        hc, hr, w = rnd(T, hidden), rnd(T, hidden), rnd(H, hidden)
        mask = torch.ones(T, H)
        for margin, form in ((None, "centering"), (torch.rand(T, H, generator=g), "abs")):
            out = fn(hc, hr, w, mask, margin, 0.01, form, None)
            torch.autograd.grad(out.loss, (hc, hr, w))
    elif op == "score_head":
        H = len(args.criteria) or 5
        h, norm_w, head = rnd(T, hidden), rnd(hidden), rnd(H, hidden)
        score_index = torch.tensor([3, 17, T - 1])
        torch.autograd.grad(fn(h, score_index, norm_w, head, 1e-6).float().sum(), (h, norm_w, head))
    elif op == "linear_cross_entropy":
        # The launch depends on the vocabulary only through BLOCK_V (capped at _MAX_BLOCK_V) and V's
        # divisibility by 16 (Triton's integer specialization): a vocabulary of 2 * _MAX_BLOCK_V with the
        # same remainder mod 16 compiles the same kernel, without bf16 matmuls over 151k rows on a CPU
        # that has no bf16 units (minutes each)
        from themis_engine.kernels.linear_ce_kernel import _MAX_BLOCK_V

        vocab = args.vocab_size if args.vocab_size <= 2 * _MAX_BLOCK_V else 2 * _MAX_BLOCK_V + args.vocab_size % 16
        h, w = rnd(T, hidden), rnd(vocab, hidden)
        labels = torch.randint(0, vocab, (T,), generator=g)
        labels[::5] = -100
        loss = fn(h, w, labels)
        loss = loss[0] if isinstance(loss, tuple) else loss
        torch.autograd.grad(loss, (h, w))
    else:
        raise ValueError(f"no workload for op {op!r}")


# ------------------------------------------------------------------------------------ compiling
def _ptxas_candidates() -> list[str]:
    """The ptxas binaries bundled with Triton (it ships more than one; the PTX version decides)."""
    import triton

    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return [os.path.join(base, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(base, n))]


def _ptxas_stats(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill-store bytes) from `ptxas -v`, or (None, None) where no bundled ptxas takes the PTX."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for ptxas in _ptxas_candidates():
            res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                                  f.name, "-o", os.devnull], capture_output=True, text=True)
            if res.returncode == 0:
                text = res.stdout + res.stderr
                regs = re.search(r"Used (\d+) registers", text)
                spill = re.search(r"(\d+) bytes spill stores", text)
                return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)
    finally:
        os.unlink(f.name)
    return None, None


def compile_launch(launch: Launch, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    row = dict(kernel=launch.kernel.__name__, warps=launch.num_warps, stages=launch.num_stages,
               constants={k: v for k, v in launch.constants.items() if v is not None}, where=sorted(launch.where))
    try:
        compiled = triton.compile(
            ASTSource(launch.kernel, launch.signature, launch.constants, launch.attrs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages),
        )
    except Exception as err:  # noqa: BLE001 - every failure is reported, none is fatal to the others
        row.update(ok=False, error=f"{type(err).__name__}: {str(err).strip()[:800]}")
        return row
    row.update(ok=True, shared=int(compiled.metadata.shared), seconds=time.perf_counter() - t0)
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and row["shared"] > limit:
        row.update(ok=False, error=f"shared memory {row['shared']} B over sm_{arch}'s {limit} B per block")
    if "ptx" in compiled.asm:
        row["registers"], row["spill_bytes"] = _ptxas_stats(compiled.asm["ptx"], arch)
    return row


def collect(models, dtypes, ops) -> list[Launch]:
    with Recorder() as rec:
        for model in models:
            args = _model_dims(model)
            for dtype in dtypes:
                for op in ops:
                    rec.context = f"{op} {model} {str(dtype).replace('torch.', '')}"
                    exercise(op, args, dtype)
    return list(rec.launches.values())


def main(argv=None) -> int:
    from themis_engine.kernels import KERNEL_MODULES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200, 80 = A100)")
    p.add_argument("--models", default="qwen3-0.6b,qwen3-8b,qwen3-32b", help="built-in shapes (comma-separated)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated torch dtypes")
    p.add_argument("--ops", default=",".join(KERNEL_MODULES), help="comma-separated ops")
    opt = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("compile_check: unset TRITON_INTERPRET (kernels must be JIT functions, not interpreted)")
    dtypes = [getattr(torch, d) for d in opt.dtypes.split(",")]
    launches = collect(opt.models.split(","), dtypes, opt.ops.split(","))
    print(f"{len(launches)} distinct launches; compiling for sm_{opt.arch}", flush=True)
    failed = 0
    print("| kernel | constants | warps | stages | shared B | registers | spill B | s | from |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for launch in launches:
        r = compile_launch(launch, opt.arch)
        consts = ", ".join(f"{k}={v}" for k, v in r["constants"].items())
        where = "; ".join(r["where"][:2]) + (f" (+{len(r['where']) - 2})" if len(r["where"]) > 2 else "")
        if r["ok"]:
            print(f"| {r['kernel']} | {consts} | {r['warps']} | {r['stages']} | {r['shared']} | {r.get('registers')} | "
                  f"{r.get('spill_bytes')} | {r['seconds']:.1f} | {where} |", flush=True)
        else:
            failed += 1
            print(f"| {r['kernel']} | {consts} | {r['warps']} | {r['stages']} | FAILED | | | | {where} |\n"
                  f"    {r['error']}", flush=True)
    print(f"compile_check: {len(launches) - failed} of {len(launches)} launches compiled for sm_{opt.arch}"
          + (f"; {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
