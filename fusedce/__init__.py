"""fusedce: a fused, memory-lean cross-entropy loss for language-model training.

``fusedce.cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy``: Triton
kernels on CUDA tensors, a chunked PyTorch implementation on the CPU.
"""

from .cpu import empty_cache
from .functional import CrossEntropyAux, cross_entropy
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .modules import CrossEntropyLoss
from .patching import patch, patched, unpatch

__version__ = "0.1.0"
__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss"]
__all__ += ["patch", "unpatch", "patched", "empty_cache", "CrossEntropyAux"]

# Submodules with heavier imports (``transformers``; ``torch.distributed``), loaded on first
# use: ``import fusedce`` then ``fusedce.hf.apply(...)`` works without ``import fusedce.hf``
_LAZY = ("hf", "distributed")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
