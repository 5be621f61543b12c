"""The pure-PyTorch implementation: what runs on the CPU (and wherever ``backend="torch"``).

The same launcher names and signatures as the Triton kernels in ``fusedce.kernels``; the
choice between the two is made per call, from the tensors (``fusedce._args``):

- ``rows``: logits (rows, C) with contiguous classes against class indices;
- ``strided``: the class dimension of (N, C, L) logits of any strides, class-probability
  targets, float64;
- ``vocab_parallel``: the per-shard passes of ``fusedce.distributed``;

over the machinery of the CPU path: ``chunks`` (cache-sized chunk loops, run as TorchScript),
``pool`` (worker threads) and ``buffers`` (reused gradient buffers, page advice).
"""

from .buffers import empty_cache, grad_buffer
from .rows import ce_bwd, ce_fwd, ce_scale_
from .strided import ce_strided_bwd, ce_strided_fwd
from .vocab_parallel import vp_grad, vp_partials

__all__ = ["ce_fwd", "ce_bwd", "ce_scale_", "ce_strided_fwd", "ce_strided_bwd", "vp_partials",
           "vp_grad", "grad_buffer", "empty_cache"]
