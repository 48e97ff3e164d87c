"""Test set-up shared by every test file.

On a machine with no GPU, Triton kernels run under the Triton interpreter: TRITON_INTERPRET must
be set before triton is first imported, so it is set here, at collection time.
Tests that need a GPU are marked `@pytest.mark.gpu` and skipped where there is none.

Shared fixtures: `device` (where kernel tests run), `tiny_rm_dir` (one tiny random Qwen3 reward
model with the five default criteria and the test tokenizer, built once per session; read-only,
a test that changes files copies it first). Building blocks for other checkpoints: helpers.py;
the tolerance rule: numerics.py.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where there is none)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device the kernel tests run on: CUDA where present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory):
    """A tiny random Qwen3 *ForSequenceClassification folder with the five default criteria (fp32)."""
    from helpers import make_checkpoint

    import themis_engine as te

    return make_checkpoint(tmp_path_factory.mktemp("tiny_rm"), "rm", family="qwen3", criteria=list(te.DEFAULT_CRITERIA))
