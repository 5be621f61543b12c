"""Triton kernels of fusedce and their host launchers.

Installed as the subpackage ``fusedce.kernels`` (see ``setup.py``); never imported as a
top-level ``kernels`` module. Importing it needs Triton, so :mod:`fusedce` imports it
lazily, on the first call that asks for the kernel backend.
"""

from .cross_entropy import ce_bwd, ce_fwd, ce_scale_
from .soft_target import ce_strided_bwd, ce_strided_fwd

__all__ = ["ce_fwd", "ce_bwd", "ce_scale_", "ce_strided_fwd", "ce_strided_bwd"]
