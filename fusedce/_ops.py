"""fusedce's loss as ``torch.library`` custom ops, so that ``torch.compile`` sees one opaque
operator with known output shapes (no graph break) and an autograd formula.

``fusedce::cross_entropy`` runs ``_function.forward`` and ``fusedce::cross_entropy_backward``
runs ``_function.backward``; the fake (meta) implementations below give the shapes, dtypes
and strides of their outputs without computing anything. The same registration serves CPU
and CUDA tensors: the implementation is picked inside, per call, from the tensors.

Importing this module needs neither Triton nor a GPU.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _function


@torch.library.custom_op("fusedce::cross_entropy", mutates_args=())
def cross_entropy_op(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                     label_smoothing: float, reduction: str, backend: str,
                     validate: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, s, denom)`` of ``x`` (N, C, L); see ``_function.forward``."""
    return _function.forward(x, target, weight, ignore_index, label_smoothing, reduction,
                             backend, validate)


@cross_entropy_op.register_fake
def _(x, target, weight, ignore_index, label_smoothing, reduction, backend, validate):
    n, _, l_len = x.shape
    acc = _function.acc_dtype(x, target, weight)
    loss = x.new_empty((n, l_len) if reduction == "none" else (), dtype=acc)
    lse = x.new_empty((n * l_len,), dtype=acc)
    s = x.new_empty((n * l_len,) if target.is_floating_point() else (0,), dtype=acc)
    denom = x.new_empty((1,), dtype=acc)
    return loss, lse, s, denom


@torch.library.custom_op("fusedce::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(grad: Tensor, x: Tensor, target: Tensor, weight: Optional[Tensor],
                              lse: Tensor, s: Tensor, denom: Tensor, ignore_index: int,
                              label_smoothing: float, reduction: str, backend: str,
                              need_dx: bool, need_dtarget: bool) -> tuple[Tensor, Tensor]:
    """``(dx, dtarget)``; an entry not asked for is an empty tensor."""
    return _function.backward(grad, x, target, weight, lse, s, denom, ignore_index,
                              label_smoothing, reduction, backend, need_dx, need_dtarget)


@cross_entropy_backward_op.register_fake
def _(grad, x, target, weight, lse, s, denom, ignore_index, label_smoothing, reduction, backend,
      need_dx, need_dtarget):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    soft = target.is_floating_point()
    dy = torch.empty_like(target) if (need_dtarget and soft) else target.new_empty(0)
    return dx, dy


def _setup_context(ctx, inputs, output):
    x, target, weight, ignore_index, label_smoothing, reduction, backend, _ = inputs
    _, lse, s, denom = output
    ctx.save_for_backward(x, target, weight, lse, s, denom)  # O(rows) besides the inputs
    ctx.options = (ignore_index, label_smoothing, reduction, backend)
    ctx.mark_non_differentiable(lse, s, denom)


def _backward(ctx, grad_loss, *_):
    x, target, weight, lse, s, denom = ctx.saved_tensors
    ignore_index, label_smoothing, reduction, backend = ctx.options
    need_dx = ctx.needs_input_grad[0]
    need_dtarget = ctx.needs_input_grad[1] and target.is_floating_point()
    if grad_loss is None or not (need_dx or need_dtarget):
        return (None,) * 8
    dx, dy = cross_entropy_backward_op(grad_loss, x, target, weight, lse, s, denom,
                                       ignore_index, label_smoothing, reduction, backend,
                                       need_dx, need_dtarget)
    return (dx if need_dx else None, dy if need_dtarget else None) + (None,) * 6


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)

def _no_double_backward(ctx, *grads):
    raise RuntimeError(_function.DOUBLE_BACKWARD_ERROR)


# The backward op is differentiable only in name: raise a clear error, never a wrong result.
cross_entropy_backward_op.register_autograd(_no_double_backward)


class EagerCrossEntropy(torch.autograd.Function):
    """The same forward, backward and saved state as the op, without the op's dispatch
    (about 0.1 ms per step on the CPU): what eager mode runs. Under torch.compile the op
    runs instead (see ``fusedce.functional``), so both modes compute identically."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, label_smoothing, reduction, backend,
                validate):
        loss, lse, s, denom = _function.forward(x, target, weight, ignore_index,
                                                label_smoothing, reduction, backend, validate)
        ctx.save_for_backward(x, target, weight, lse, s, denom)
        ctx.options = (ignore_index, label_smoothing, reduction, backend)
        return loss

    @staticmethod
    @_function.first_order_only
    def backward(ctx, grad_loss):
        x, target, weight, lse, s, denom = ctx.saved_tensors
        ignore_index, label_smoothing, reduction, backend = ctx.options
        need_dx = ctx.needs_input_grad[0]
        need_dtarget = ctx.needs_input_grad[1] and target.is_floating_point()
        dx, dy = _function.backward(grad_loss, x, target, weight, lse, s, denom, ignore_index,
                                    label_smoothing, reduction, backend, need_dx, need_dtarget)
        return (dx if need_dx else None, dy if need_dtarget else None) + (None,) * 6
