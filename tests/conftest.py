"""Test set-up: without a GPU the Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported; fusedce imports triton lazily, so
setting it here, at collection, is early enough.

The interpreter converts float32 to bfloat16 by dropping the low 16 bits (rounding toward
zero, a bias of up to one ulp), where the GPU's conversion rounds to nearest even (Triton's
default ``fp_downcast_rounding``) as PyTorch's does: ``round_bfloat16_like_the_gpu`` makes
it round as the GPU does, so that bf16 results are held to what the GPU computes
(``tests/test_kernels.py`` checks the patch against PyTorch's rounding).
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def round_bfloat16_like_the_gpu():
    """Patch the interpreter's float conversion: float32 to bfloat16 rounds to nearest even
    (through PyTorch's conversion); every other conversion is the interpreter's own."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    if getattr(convert, "rounds_like_the_gpu", False):
        return

    def rounded(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and \
                rounding_mode != interpreter._ir.ROUNDING_MODE.RTZ:
            values = torch.from_numpy(np.ascontiguousarray(input).view(np.float32))
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    rounded.rounds_like_the_gpu = True
    interpreter._convert_float = rounded


if os.environ.get("TRITON_INTERPRET") == "1":
    round_bfloat16_like_the_gpu()


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


@pytest.fixture(params=["own", "hand-off"])
def either_route(request):
    """Both routes a default-backend CPU call can take: fusedce's own path (``own_path``) and
    the hand-off of a small call to PyTorch's loss. For behaviour every call must have
    (PyTorch's errors and warnings, the module's arguments): on the hand-off route alone a
    comparison with PyTorch compares PyTorch with itself."""
    if request.param == "own":
        request.getfixturevalue("own_path")
    return request.param


def pytest_sessionfinish(session, exitstatus):
    """Under CI (``CI=true``, as ``.ci/run`` runs there) a skipped test fails the run: CI
    installs every optional dependency (``.[dev]``), so a skip there is a check that did
    not run (an extra no longer installed, an ``importorskip`` that lost its module), not
    a pass."""
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} skipped test(s) count as failures here",
                            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Under the README's `pytest -n 2 --dist loadfile --no-loadscope-reorder`, whole files go to
# the workers in collection order (xdist's default order is by number of tests, which put
# test_gpu_compile.py's 22 near the end): the longest first (ptxas builds and a dry run of
# the GPU script; PyTorch's samples), so that neither worker ends the run alone on one.
LONGEST_FIRST = ("test_gpu_compile.py", "test_pytorch_samples.py", "test_higher_order.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
