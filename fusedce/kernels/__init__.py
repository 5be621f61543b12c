"""Triton kernels of fusedce and their host launchers.

The same launcher names and signatures as the PyTorch implementation in ``fusedce.cpu``;
the choice between the two is made per call (``fusedce._args.implementation``). Importing
this package needs Triton, so fusedce imports it lazily, on the first call that asks for it.
"""

import functools

import torch

from . import cross_entropy, split_rows, strided, vocab_parallel
from .cross_entropy import grad_buffer


def _on_the_tensors_device(launcher):
    """``launcher`` run with the current CUDA device set to that of its first argument.
    Triton launches on the current device and its current stream, not on the tensors':
    logits on cuda:1 while cuda:0 is current (the LM head of a model spread over GPUs by
    ``device_map="auto"``) would be launched on cuda:0, whose stream is not ordered after
    the one that made them (or fail: 'Pointer argument cannot be accessed from Triton')."""

    @functools.wraps(launcher)
    def launch(x, *args, **kwargs):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(x, *args, **kwargs)
        return launcher(x, *args, **kwargs)

    return launch


ce_fwd = _on_the_tensors_device(split_rows.ce_fwd)  # the row kernels, rows split where few
ce_bwd = _on_the_tensors_device(split_rows.ce_bwd)
ce_scale_ = _on_the_tensors_device(cross_entropy.ce_scale_)
ce_strided_fwd = _on_the_tensors_device(strided.ce_strided_fwd)
ce_strided_bwd = _on_the_tensors_device(strided.ce_strided_bwd)
vp_partials = _on_the_tensors_device(vocab_parallel.vp_partials)
vp_grad = _on_the_tensors_device(vocab_parallel.vp_grad)

__all__ = ["ce_fwd", "ce_bwd", "ce_scale_", "ce_strided_fwd", "ce_strided_bwd", "vp_partials",
           "vp_grad", "grad_buffer"]
