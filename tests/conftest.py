"""Test set-up: without a GPU the Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported; fusedce imports triton lazily, so
setting it here, at collection, is early enough.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def nan_filled_outputs(monkeypatch):
    """Fresh floating-point buffers start as NaN for the test (see tests/nan_fill.py)."""
    import nan_fill

    nan_fill.install(monkeypatch.setattr)


@pytest.fixture
def own_path(monkeypatch):
    """fusedce's own implementation for every call, small ones included: tests of that
    implementation (its CPU path, numerics, in-place mode, patching, compile support) use
    the default backend, whose small CPU calls otherwise go to PyTorch's loss
    (``fusedce/_route.py``; tests/test_route.py tests that hand-off)."""
    from fusedce import _route

    monkeypatch.setattr(_route, "HAND_OFF", False)
    monkeypatch.setattr(_route, "SMALLEST", 0)  # as _route.set_hand_off(False)
