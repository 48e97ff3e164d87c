"""The kernel package's recipe, checked on its sources: one torch.library namespace registered
through one helper, shared glue in kernels/_utils.py (no kernel imports a sibling kernel), and
THEMIS_KERNELS read by kernels.backend_for alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from themis_engine import kernels

ROOT = Path(__file__).resolve().parents[2]
KERNEL_FILES = sorted((ROOT / "themis_engine" / "kernels").glob("*.py"))
KERNEL_MODULES = sorted(p.stem for p in KERNEL_FILES if p.stem.endswith("_kernel"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_kernel_imports_a_sibling_kernel():
    assert {"attention_kernel", "rmsnorm_kernel", "rope_kernel", "swiglu_kernel"} <= set(KERNEL_MODULES)
    for path in KERNEL_FILES:
        if not path.stem.endswith("_kernel"):
            continue
        imported = _imports(path)
        siblings = {m for m in KERNEL_MODULES if m != path.stem and any(i.endswith(m) or f".{m}." in i
                                                                      for i in imported)}
        assert not siblings, f"{path.name} imports {siblings}"
        assert "themis_engine.kernels._utils" in imported, f"{path.name} does not use the shared glue"


def test_every_op_is_registered_in_one_namespace_through_one_helper():
    for path in KERNEL_FILES:
        text = path.read_text()
        if path.name != "_utils.py":
            assert "torch.library.custom_op" not in text and "torch.library.register_fake" not in text, path.name
        # no op is called by a namespace-qualified string other than themis::
        for ns in re.findall(r'"(\w+)::\w+', text):
            assert ns in ("themis", "themis_cuda"), f"{path.name}: op namespace {ns}"
    for module in KERNEL_MODULES:
        __import__(f"themis_engine.kernels.{module}")
    ops = {name for name in dir(torch.ops.themis) if not name.startswith("_") and name != "name"}
    assert {"attention_fwd", "attention_bwd", "rms_norm_fwd", "add_rms_norm_fwd", "rms_norm_bwd", "rope_fwd",
            "rope_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd", "swiglu_fwd", "swiglu_bwd", "bt_loss_fwd",
            "bt_loss_bwd", "linear_ce_fwd"} <= ops
    assert not hasattr(torch.ops, "themis_engine") or not [
        n for n in dir(torch.ops.themis_engine) if not n.startswith("_") and n != "name"]


def test_only_backend_for_reads_themis_kernels():
    """THEMIS_KERNELS appears in code (not docstrings or comments) of two files only: the table of
    environment variables (config.py) and its one reader, kernels/__init__.py (backend_for)."""
    readers = set()
    for path in sorted((ROOT / "themis_engine").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == "THEMIS_KERNELS":
                readers.add(str(path.relative_to(ROOT)))
    assert readers == {"themis_engine/kernels/__init__.py", "themis_engine/config.py"}, readers


def test_dispatch_covers_every_op():
    x = torch.zeros(2, 4)
    for op in kernels.OPS:
        # CPU, auto: PyTorch's fused CPU attention for attention, the references for the rest
        assert kernels.backend_for(op, x) == ("sdpa" if op in kernels.SDPA_OPS else "reference"), op
    for op in kernels.CUDA_EXT_OPS:
        assert op in kernels.OPS
    assert callable(kernels.implementation("add_rms_norm", x)) and callable(kernels.implementation("score_head", x))
