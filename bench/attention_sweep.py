"""Attention tile sweep: time candidate block sizes / warps / stages of the attention kernel, so
that one GPU call gives the data to choose `attention_kernel.default_blocks`.

    python bench/attention_sweep.py                    # GPU: every candidate, dense causal + prefix-shared
    python bench/attention_sweep.py --static           # no GPU: compile each candidate for sm_90 and report
                                                       # shared memory, registers and spills (prefilter)
    python bench/attention_sweep.py --cpu --head-dim 32  # smoke: two candidates, tiny sizes, Triton interpreter

Workloads (bench/kernel_ops.py's): dense causal, 4 segments of 4096 tokens; prefix-shared, 16384
tokens in groups of a 2048-token prefix + 2 suffixes of 1024..2048. Hq=32, Hkv=8, D=128, bf16.
Each candidate is checked against the default's output and gradients on the same inputs (max
|diff| / max |default|; a candidate over 2e-2 is marked WRONG) and timed with the bench harness
(bench/_harness.py: CUDA events after an L2 flush, median). TFLOP/s count the visible (query, key)
pairs only (forward 4*D*Hq*pairs, forward+backward 3.5x that), as bench/kernel_ops.py does.
Options go through themis_engine.config (`--key value`, a flag alone for true; --help lists them).
"""

import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

BENCH = str(Path(__file__).resolve().parent)
if BENCH not in sys.path:  # bench/: the shared harness
    sys.path.insert(0, BENCH)
import _harness as harness  # noqa: E402

from themis_engine.config import option  # noqa: E402

ROOT = harness.ROOT
PROG = "python bench/attention_sweep.py"


@dataclass
class SweepConfig:
    """Time candidate tile sizes of the attention kernel (or compile them statically)."""

    head_dim: int = option(128, "head dimension of the workloads (the candidate list depends on it)")
    static: bool = option(False, "no GPU: compile the candidates for --arch and report shared memory, "
                                 "registers and spills")
    arch: int = option(90, "--static: the SM architecture to compile for")
    repeat_ms: float = option(200.0, "GPU time to spend repeating each measurement")
    cpu: bool = option(False, "smoke mode: tiny sizes, two candidates, Triton interpreter")
    json: Optional[str] = option(None, "also write the rows to this JSON file")


def _bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernel_ops.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def candidates(head_dim: int):
    """Candidate AttentionBlocks(fwd_m, fwd_n, dq_m, dq_n, dkv_m, dkv_n, fwd_warps, bwd_warps, stages)."""
    from themis_engine.kernels.attention_kernel import AttentionBlocks as B

    if head_dim <= 64:
        return [B(128, 64, 64, 64, 32, 128, 4, 4, 3), B(128, 64, 64, 64, 32, 128, 8, 8, 3),
                B(128, 64, 64, 64, 64, 64, 8, 8, 3), B(128, 128, 128, 64, 64, 128, 8, 8, 3),
                B(64, 64, 64, 64, 64, 64, 4, 4, 3)]
    # --static on sm_90 (triton 3.9, 2026-11-26): the 4-warp variants spill 250-2400 B in dK/dV and
    # are left out; (128, 64, 128, 32, 32, 128, 8, 8, 2) is the one with no spill in any kernel
    return [
        B(128, 64, 64, 64, 64, 64, 8, 8, 2),    # the default (2026-11-26): dK/dV 255 regs, 112 B spill
        B(128, 64, 64, 64, 64, 64, 8, 8, 3),
        B(128, 128, 64, 64, 64, 64, 8, 8, 2),
        B(128, 64, 128, 64, 64, 128, 8, 8, 2),
        B(128, 64, 64, 64, 32, 128, 8, 8, 2),
        B(128, 64, 128, 32, 32, 128, 8, 8, 2),  # no spill
        B(128, 64, 128, 32, 32, 128, 8, 8, 3),
    ]


def static(head_dim: int, arch: int) -> list[dict]:
    """Compile each candidate's three kernels for sm_<arch> (no GPU): shared memory, registers, spills."""
    os.environ.pop("TRITON_INTERPRET", None)
    from themis_engine.kernels import attention_kernel as A
    from themis_engine.kernels.compile_check import Recorder, compile_launch

    T, Hq, Hkv = 40, 32, 8
    cu = torch.tensor([0, 12, 22, 30, T], dtype=torch.int32)
    ps = torch.zeros(4, dtype=torch.int32)
    pl = torch.tensor([0, 12, 12, 0], dtype=torch.int32)
    rows = []
    for cand in candidates(head_dim):
        q = torch.randn(T, Hq, head_dim, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(T, Hkv, head_dim, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(T, Hkv, head_dim, dtype=torch.bfloat16, requires_grad=True)
        with Recorder() as rec:
            out, _ = A.attention(q, k, v, cu, ps, pl, 12, head_dim**-0.5, blocks=cand)
            torch.autograd.grad(out.float().sum(), (q, k, v))
        row = dict(blocks=asdict(cand))
        for launch in rec.launches.values():
            r = compile_launch(launch, arch)
            name = r["kernel"].replace("_attn_", "").replace("_kernel", "")
            row[name] = (f"{r['shared'] // 1024} KB, {r.get('registers')} regs, {r.get('spill_bytes')} B spill"
                         if r["ok"] else "FAILED: " + r["error"][:200])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def sweep(head_dim: int, repeat_ms: float, cpu: bool = False) -> list[dict]:
    from themis_engine.kernels import attention_kernel as A

    bk = _bench_kernels()
    dev = torch.device("cpu" if cpu else "cuda")

    def timer(fn) -> harness.Timing:
        return harness.benchmark(fn, dev, warmup=1, repeats=1 if cpu else 5, target_ms=repeat_ms, max_repeats=50)
    Hq, Hkv, dt = (4, 1, torch.float32) if cpu else (32, 8, torch.bfloat16)
    if cpu:  # smoke: every code path at tiny sizes under the Triton interpreter
        workloads = {"dense": bk.dense_workload(2, 48), "prefix": bk.prefix_workload(160, 32, (16, 40), 2)}
    else:
        workloads = {"dense": bk.dense_workload(4, 4096), "prefix": bk.prefix_workload(16384, 2048, (1024, 2048), 2)}
    rows = []
    for wname, segs in workloads.items():
        T = segs[-1][0] + segs[-1][1]
        cu, ps, pl, max_seqlen = bk._meta(segs, dev)
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(T, h, head_dim, generator=g).to(dev, dt).requires_grad_(True) for h in (Hq, Hkv, Hkv))
        do = torch.randn(T, Hq, head_dim, generator=g).to(dev, dt)
        fwd_flops = 4.0 * head_dim * Hq * bk.visible_pairs(segs)
        base = None
        cands = candidates(head_dim)
        for cand in ([cands[0], cands[2]] if cpu else cands):
            def fwd(c=cand):
                return A.attention(q, k, v, cu, ps, pl, max_seqlen, head_dim**-0.5, blocks=c)[0]

            def fwd_bwd(c=cand):
                return torch.autograd.grad(fwd(c), (q, k, v), do)

            row = dict(workload=wname, blocks=asdict(cand))
            try:
                outs = [fwd().detach()] + [x.detach() for x in fwd_bwd()]
                if base is None:
                    base = outs
                row["max_rel_diff_vs_first"] = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                                                   for a, b in zip(outs, base))
                t_f, t_fb = timer(fwd).median_ms, timer(fwd_bwd).median_ms
                row.update(fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=fwd_flops / t_f / 1e9,
                           fwd_bwd_tflops=3.5 * fwd_flops / t_fb / 1e9)
            except Exception as err:  # noqa: BLE001 - a candidate that fails is reported, the sweep goes on
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_table(rows):
    table = []
    for r in rows:
        b = " ".join(str(x) for x in r["blocks"].values())
        if "error" in r:
            table.append([r["workload"], b, f"ERROR {r['error'][:80]}", "", "", "", ""])
            continue
        flag = " WRONG" if r["max_rel_diff_vs_first"] > 2e-2 else ""
        table.append([r["workload"], b, f"{r['fwd_ms']:.3f}", f"{r['fwd_tflops']:.0f}", f"{r['fwd_bwd_ms']:.3f}",
                      f"{r['fwd_bwd_tflops']:.0f}", f"{r['max_rel_diff_vs_first']:.1e}{flag}"])
    print(harness.markdown_table(["workload", "fwd_m fwd_n dq_m dq_n dkv_m dkv_n fwd_w bwd_w stages", "fwd ms",
                                  "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "rel diff vs first"], table))


def parse_args(argv=None) -> SweepConfig:
    return harness.parse(SweepConfig, argv, prog=PROG, description=__doc__)


def main(argv=None):
    opt = parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not (opt.cpu or opt.static) else "cpu")
    env = harness.environment(dev, "attention_sweep.py", argv)
    if opt.static:
        rows = static(opt.head_dim, opt.arch)
    else:
        if not opt.cpu and not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: --static compiles the candidates without one, --cpu is a smoke run")
        rows = sweep(opt.head_dim, opt.repeat_ms, cpu=opt.cpu)
        print()
        print(harness.header("attention tile sweep", env, f"head_dim {opt.head_dim}"))
        print_table(rows)
    harness.write_json(opt.json, {"env": env, "rows": rows})
    return rows


if __name__ == "__main__":
    want_interpreter = "--cpu" in sys.argv
    if bool(os.environ.get("TRITON_INTERPRET")) != want_interpreter:  # before Triton is imported
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if want_interpreter:
            env["TRITON_INTERPRET"] = "1"
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    main()
