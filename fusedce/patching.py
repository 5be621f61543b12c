"""Make existing code use fusedce: ``fusedce.patch()`` / ``fusedce.unpatch()`` and the
context manager ``with fusedce.patched(): ...``.

Patching replaces

- ``torch.nn.functional.cross_entropy`` (what code calling ``F.cross_entropy`` /
  ``nn.functional.cross_entropy`` through the module attribute finds, Hugging Face's loss
  code included), and
- ``torch.nn.CrossEntropyLoss.forward`` (modules built before or after patching), and
- by default, the global ``cross_entropy`` of already-imported modules outside ``torch``
  when it is the original function, as left by ``from torch.nn.functional import
  cross_entropy`` (a name imported after patching is the patched function anyway; other
  names for the original, e.g. ``import ... as ce``, are not touched).

``unpatch()`` (or leaving the ``with`` block, also by an exception) puts back exactly what
was replaced, and rebinds the ``cross_entropy`` of modules imported inside the block. While
patched, pickling an object that holds PyTorch's own function fails (pickle finds fusedce's
under its name): save it outside the block.

DTensor logits of the layouts fusedce takes go to fusedce (``fusedce/_dtensor.py``: inside
``loss_parallel()`` too); other DTensors and other tensor subclasses (anything but
``torch.Tensor`` and ``nn.Parameter``: tensors with ``__torch_function__``) go to PyTorch's
own implementation.
"""

import contextlib
import sys
import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import _args, _dtensor, _route
from .functional import _IGNORE_INDEX, _SMOOTHING, OPTIONS, cross_entropy

_lock = threading.RLock()
_state = {"depth": 0, "saved": None, "options": {}}
_ORIGINAL_CE = F.cross_entropy
_ORIGINAL_FORWARD = nn.CrossEntropyLoss.forward
_TENSOR = torch.Tensor


def _plain_tensors(*tensors):
    return all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors if t is not None)


def _patched_cross_entropy(input, target, weight=None, size_average=None,
                           ignore_index=_IGNORE_INDEX, reduce=None, reduction="mean",
                           label_smoothing=_SMOOTHING):
    options = _state["options"]
    if type(input) is _TENSOR and type(target) is _TENSOR and weight is None and not options:
        # the usual call, in as few steps as possible: fusedce.cross_entropy's first test
        # hands a small one to PyTorch's loss
        return cross_entropy(input, target, None, size_average, ignore_index, reduce,
                             reduction, label_smoothing)
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)):
        return _ORIGINAL_CE(input, target, weight, size_average, ignore_index, reduce,
                            reduction, label_smoothing)  # PyTorch's TypeError
    if not _plain_tensors(input, target, weight) and not (
            _dtensor.is_dtensor(input) and _dtensor.serves(input, target)):
        return _route.pytorch_cross_entropy(input, target, weight, size_average, ignore_index,
                                            reduce, reduction, label_smoothing)
    return cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                         label_smoothing, **options)


def _patched_forward(self, input, target):
    return _patched_cross_entropy(input, target, weight=self.weight,
                                  ignore_index=self.ignore_index, reduction=self.reduction,
                                  label_smoothing=self.label_smoothing)


# PyTorch's docstring and (through __wrapped__) signature, but its own name and module: with
# functools.wraps' ``torch.nn.functional.cross_entropy`` pickle took it for PyTorch's, and a
# model holding it could not be saved (``not the same object as``) once the block was left
_patched_cross_entropy.__doc__ = _ORIGINAL_CE.__doc__
_patched_cross_entropy.__wrapped__ = _ORIGINAL_CE
_patched_cross_entropy.__fusedce_patch__ = True
_patched_forward.__fusedce_patch__ = True


def _module_aliases(function=_ORIGINAL_CE):
    """``(module, "cross_entropy")`` for the modules outside torch and fusedce whose global
    ``cross_entropy`` is ``function`` (the original: ``from torch.nn.functional import
    cross_entropy``). Other names bound to it are left alone: code that keeps the original
    under a name of its own (to wrap or compare it) keeps it."""
    found = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod_name.split(".")[0] in ("torch", "fusedce"):
            continue
        try:
            namespace = vars(mod)
        except Exception:  # noqa: BLE001 - not a module with a namespace: nothing to patch
            continue
        if namespace.get("cross_entropy") is function:
            found.append((mod, "cross_entropy"))
    return found


def is_patched():
    """Whether ``torch.nn.functional.cross_entropy`` is fusedce's at the moment."""
    return getattr(F.cross_entropy, "__fusedce_patch__", False)


def patch(*, scan_modules=True, backend="auto", inplace_backward=False, validate=None):
    """Route ``torch.nn.functional.cross_entropy`` and ``torch.nn.CrossEntropyLoss`` to fusedce.

    scan_modules: also rebind ``cross_entropy`` in imported modules outside torch where it
        is the original function (``from torch.nn.functional import cross_entropy``).
    backend, inplace_backward, validate: passed to every patched call (see
        :func:`fusedce.cross_entropy`). ``inplace_backward=True`` destroys the logits of
        code that did not ask for it: use it only for code known to discard them.

    Calls nest: each ``patch()`` needs one ``unpatch()``; the outermost options apply.
    """
    _args.run_options(backend, inplace_backward, validate)  # here, not at the first loss
    with _lock:
        _state["depth"] += 1
        if _state["depth"] > 1:
            return
        aliases = _module_aliases() if scan_modules else []
        _state["saved"] = (F.cross_entropy, nn.CrossEntropyLoss.__dict__.get("forward"),
                           aliases, scan_modules)
        # only those that differ from cross_entropy's defaults: none is the usual call
        given = {"backend": backend, "inplace_backward": inplace_backward,
                 "validate": validate}
        _state["options"] = {name: value for name, value in given.items()
                             if not (type(value) is type(OPTIONS[name])
                                     and value == OPTIONS[name])}
        F.cross_entropy = _patched_cross_entropy
        nn.CrossEntropyLoss.forward = _patched_forward
        for mod, name in aliases:
            setattr(mod, name, _patched_cross_entropy)


def unpatch():
    """Undo :func:`patch` (the innermost of nested calls does nothing until the outermost)."""
    with _lock:
        if _state["depth"] == 0:
            return
        _state["depth"] -= 1
        if _state["depth"] > 0:
            return
        functional_ce, forward, aliases, scan_modules = _state["saved"]
        F.cross_entropy = functional_ce
        nn.CrossEntropyLoss.forward = forward
        if scan_modules:  # also the modules imported inside the block, which took fusedce's
            aliases = _module_aliases(_patched_cross_entropy)
        for mod, name in aliases:
            if vars(mod).get(name) is _patched_cross_entropy:
                setattr(mod, name, functional_ce)
        _state["saved"] = None
        _state["options"] = {}


@contextlib.contextmanager
def patched(*, scan_modules=True, backend="auto", inplace_backward=False, validate=None):
    """``with fusedce.patched(): ...`` runs the block with :func:`patch` in force (its
    options) and restores everything on exit, also when the block raises."""
    patch(scan_modules=scan_modules, backend=backend, inplace_backward=inplace_backward,
          validate=validate)
    try:
        yield
    finally:
        unpatch()
