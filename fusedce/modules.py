"""``fusedce.CrossEntropyLoss``, mirroring ``torch.nn.CrossEntropyLoss``."""

import torch
from torch import nn

from . import _args
from .functional import cross_entropy


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` computed by :func:`fusedce.cross_entropy`.

    Takes the same arguments (it is a subclass, so ``isinstance`` checks, ``state_dict`` and
    the ``weight`` buffer behave the same; the legacy ``size_average``/``reduce`` set
    ``reduction`` with PyTorch's warning), plus fusedce's keyword-only ``backend``,
    ``inplace_backward`` and ``validate`` and the loss extras ``logit_scale``, ``softcap``
    and ``lse_square_scale`` (see :func:`fusedce.cross_entropy`; ``return_aux`` is the
    function's: a module returns the loss).
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, backend="auto",
                 inplace_backward=False, validate=None, logit_scale=1.0, softcap=None,
                 lse_square_scale=0.0):
        super().__init__(weight, size_average, ignore_index, reduce, reduction,
                         label_smoothing)
        _args.run_options(backend, inplace_backward, validate)
        self.backend = backend
        self.inplace_backward = inplace_backward
        self.validate = validate
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.lse_square_scale = lse_square_scale

    # TorchScript cannot compile fusedce's Python: a scripted model holding this module
    # calls it as Python, as for any torch.jit.ignore'd method (not saveable on its own)
    @torch.jit.ignore
    def forward(self, input, target):
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             backend=self.backend, inplace_backward=self.inplace_backward,
                             validate=self.validate, logit_scale=self.logit_scale,
                             softcap=self.softcap, lse_square_scale=self.lse_square_scale)
