"""Fixtures shared by the kernel tests (tests/conftest.py sets up the Triton interpreter and the
`device` fixture; tests/numerics.py holds the tolerance rules)."""

from __future__ import annotations

import pytest


@pytest.fixture
def themis_kernels(monkeypatch):
    """Set THEMIS_KERNELS for one test: `themis_kernels("triton")`. kernels.backend_for reads it at
    every call, so this switches every op of themis_engine.kernels; undone after the test."""

    def use(backend: str) -> None:
        monkeypatch.setenv("THEMIS_KERNELS", backend)

    return use
