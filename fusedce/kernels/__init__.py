"""Triton kernels of fusedce and their host launchers.

The same launcher names and signatures as the PyTorch implementation in ``fusedce.cpu``;
the choice between the two is made per call (``fusedce._args.implementation``). Importing
this package needs Triton, so fusedce imports it lazily, on the first call that asks for it.
"""

from .cross_entropy import ce_scale_, grad_buffer
from .split_rows import ce_bwd, ce_fwd  # the row kernels, rows split where few
from .strided import ce_strided_bwd, ce_strided_fwd
from .vocab_parallel import vp_grad, vp_partials

__all__ = ["ce_fwd", "ce_bwd", "ce_scale_", "ce_strided_fwd", "ce_strided_bwd", "vp_partials",
           "vp_grad", "grad_buffer"]
