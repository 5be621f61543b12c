"""Fresh floating-point buffers filled with NaN, so an element a kernel forgot to write
shows up as NaN in the result instead of as whatever the memory held.

Shared by the ``nan_filled_outputs`` fixture (tests/conftest.py) and by test processes that
pytest's fixtures do not reach (the distributed tests' spawned workers).
"""

import torch
import torch._dynamo  # noqa: F401

# (torch._dynamo first: imported later, e.g. by a TorchDispatchMode entered while torch.empty
# is replaced, its trace rules would take the replacement for torch.empty, and a later
# torch.compile would refuse the real one: "Attempted to call function marked as skipped")


def _nan_filled(empty_fn):
    def fn(*args, **kwargs):
        out = empty_fn(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    return fn


def install(setattr=setattr):
    """Replaces ``torch.empty`` and ``torch.empty_like`` by NaN-filling versions, through
    ``setattr`` (pytest's ``monkeypatch.setattr`` to have them restored afterwards)."""
    setattr(torch, "empty", _nan_filled(torch.empty))
    setattr(torch, "empty_like", _nan_filled(torch.empty_like))
