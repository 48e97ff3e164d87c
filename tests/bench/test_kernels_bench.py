"""bench/kernel_ops.py's CPU smoke mode: every benchmark path (kernels under the Triton interpreter, the
references, SDPA, FlexAttention's block mask and eager forward) runs at tiny sizes and agrees with
the references, and the tables and the JSON come out."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import load


@pytest.mark.slow  # ~15 s on 2 CPU cores
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode needs the Triton interpreter; "
                    "on a GPU run bench/kernel_ops.py itself")
def test_kernels_bench_cpu_smoke(tmp_path, capsys):
    mod = load("kernel_ops")
    out_json = tmp_path / "kernels.json"
    res = mod.main(["--cpu", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert res["env"]["errors"] == []
    sections = res["sections"]
    for name in ("copy", "attention_prefix", "attention_dense", "bt_loss", "linear_ce", "rms_norm",
                 "rms_norm_residual", "rope", "qk_norm_rope", "swiglu"):
        assert name in sections, name
        assert sections[name]["title"] in text, name
    # every implementation ran (FlexAttention forward-only on CPU) and agrees with the reference
    for name, sec in sections.items():
        if name == "copy":
            continue
        for row in sec["rows"]:
            if row["impl"] == "FlexAttention" and row["pass"] == "fwd+bwd":
                continue
            assert row["ms"] is not None and "failed" not in (row["note"] or ""), row
            assert row["err"] is not None and row["err"] < 1e-5, row
    impls = {r["impl"] for r in sections["attention_dense"]["rows"]}
    assert {"themis (triton)", "SDPA flash", "FlexAttention", "reference"} <= impls
    assert {r["impl"] for r in sections["attention_prefix"]["rows"]} >= {"themis (triton)", "FlexAttention"}
    # the targets table is printed last, every target has a row
    assert len(res["targets"]) == 13
    assert text.rstrip().splitlines()[-1].startswith("| swiglu fwd+bwd GB/s vs copy")
    data = json.loads(out_json.read_text())
    assert data["copy_gbps"] > 0 and len(data["targets"]) == 13
    assert data["sections"]["attention_prefix"]["rows"][0]["visible_pairs"] > 0


def test_visible_pairs_counts_the_mask():
    """The FLOP count's visible (query, key) pairs equal the number of ones of the reference mask."""
    mod = load("kernel_ops")
    for segs in (mod.prefix_workload(97, 20, (5, 17), 3, seed=1), mod.prefix_workload(50, 9, (2, 6), 2),
                 mod.dense_workload(3, 11)):
        T = segs[-1][0] + segs[-1][1]
        assert [s for s, *_ in segs] == sorted(s for s, *_ in segs) and segs[0][0] == 0
        seg = torch.empty(T, dtype=torch.long)
        lo = torch.zeros(T, dtype=torch.long)
        hi = torch.zeros(T, dtype=torch.long)
        for i, (s, n, p0, p) in enumerate(segs):
            seg[s:s + n], lo[s:s + n], hi[s:s + n] = i, p0, p0 + p
        q = torch.arange(T)[:, None]
        k = torch.arange(T)[None, :]
        mask = ((seg[q] == seg[k]) & (k <= q)) | ((k >= lo[q]) & (k < hi[q]))
        assert int(mask.sum()) == mod.visible_pairs(segs)


def test_attention_sweep_cpu_smoke(capsys):
    """bench/attention_sweep.py's timing path at tiny sizes: two tile candidates, same results."""
    rows = load("attention_sweep").main(["--cpu", "--head-dim", "32"])
    out = capsys.readouterr().out
    assert len(rows) == 4 and all("error" not in r for r in rows), rows
    assert {r["workload"] for r in rows} == {"dense", "prefix"}
    assert rows[0]["blocks"] != rows[1]["blocks"]  # two different tilings of the same inputs ...
    assert all(r["max_rel_diff_vs_first"] < 1e-5 for r in rows)  # ... agree (float32)
    assert "| dense |" in out and "| prefix |" in out
