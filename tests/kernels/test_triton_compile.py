"""Every Triton kernel compiles for sm_90 (H100/H200) at the launches real model shapes make, on a
machine with no GPU (kernels/compile_check.py), and the check does fail on a kernel that cannot
compile. Runs in subprocesses: the kernels must be JIT functions there, not interpreted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except Exception:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="Triton's NVIDIA backend is not installed")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _check(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "themis_engine.kernels.compile_check", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_at_qwen3_shapes():
    res = _check("--models", "qwen3-0.6b,qwen3-32b", "--dtypes", "bfloat16")
    print(res.stdout[-6000:])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "FAILED" not in res.stdout
    # every kernel of every op was launched and compiled
    for name in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_bwd_delta_kernel",
                 "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_qk_norm_rope_fwd_kernel",
                 "_qk_norm_rope_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_bt_fwd_kernel",
                 "_bt_bwd_kernel", "_ce_rows_kernel"):
        assert f"| {name} |" in res.stdout, name


BROKEN = '''
import triton
import triton.language as tl


@triton.jit
def mixed_dot(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])            # bf16
    b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])            # fp32: tl.dot needs the same type
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))
'''

PROBE = '''
import sys, torch
sys.path.insert(0, sys.argv[1])
from themis_engine.kernels.compile_check import Recorder, compile_launch
import broken
a = torch.zeros(32, 32, dtype=torch.bfloat16)
b = torch.zeros(32, 32, dtype=torch.float32)
with Recorder() as rec:
    broken.mixed_dot[(1,)](a, b, b, BLOCK=32)
    broken.mixed_dot[(1,)](a, a, b, BLOCK=32)  # same types: compiles
rows = [compile_launch(l, 90) for l in rec.launches.values()]
print([r["ok"] for r in rows])
print(rows[0].get("error", "")[:300])
'''


def test_the_check_reports_a_kernel_that_does_not_compile(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE), str(tmp_path)], env=_env(),
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "[False, True]", res.stdout
    assert "CompilationError" in lines[1], res.stdout
