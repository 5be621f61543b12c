"""Helpers shared by the test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""

import itertools
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# the two implementations every value case runs: the Triton kernels (under Triton's
# interpreter on a machine without a GPU) and the PyTorch implementation
BACKENDS = ["triton", "torch"]

_PARAM = type(pytest.param())  # what pytest.param returns


def combine(*lists, slow=None):
    """The cross product of parameter lists, as one list for one ``parametrize``.

    Gives what stacking one ``parametrize`` per list would (values in order, ids joined by
    '-', first list first), so node ids do not change, but each combination can be marked
    ``slow`` on its own: ``slow(ids)`` gets the tuple of ids, one per list. Plain values
    (not ``pytest.param``) take ``str(value)`` as their id.
    """
    params = [[p if isinstance(p, _PARAM) else pytest.param(p, id=str(p)) for p in lst]
              for lst in lists]
    out = []
    for combo in itertools.product(*params):
        ids = tuple(p.id for p in combo)
        marks = [m for p in combo for m in p.marks]
        if slow is not None and slow(ids):
            marks.append(pytest.mark.slow)
        out.append(pytest.param(*(v for p in combo for v in p.values), id="-".join(ids),
                                marks=marks))
    return out


def gpt2_under_interpreter(ids):
    """For ``combine(..., slow=...)``: the combinations that run the GPT-2 vocabulary (an id
    naming 'gpt2') through the Triton kernels, which the interpreter runs in Python."""
    return "triton" in ids and any("gpt2" in i for i in ids)


def checkout_env(**changes):
    """``os.environ`` with the checkout first on PYTHONPATH, for a subprocess that imports
    ``bench`` and this checkout's fusedce; ``changes`` set more variables."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **changes)
