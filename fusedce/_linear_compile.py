"""``linear_cross_entropy`` as torch.compile sees it: opaque ops, one graph.

The eager loss calls back into Python for each chunk (its launchers, the CPU path's worker
threads), which torch.compile cannot trace: it broke the graph at the loss. While compiling,
the loss runs instead as ``fusedce::linear_ce`` (the eager loss of the checked arguments
and, for 'mean' / 'sum', its gradients of upstream 1, computed in the same pass, as the
eager forward does) in ``linear.LinearCrossEntropyFunction``'s forward, whose backward then
multiplies them by the upstream gradient with ops torch.compile traces (``forward`` and
``backward`` here; ``loss_only`` without a gradient). 'none' takes ``fusedce::linear_ce_grad``
in the backward, which computes the loss again with its gradients (the eager backward of
'none' computes the logits again too).

Class-index targets without aux outputs, in fp32 or bf16: probability targets, aux outputs
and float16 (whose gradients the eager loss keeps scaled up, out of float16's underflow,
until the upstream multiplies them) still break the graph.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _args, _loss


def serves(x, t, extras):
    """Whether this module serves a compiled call of the checked arguments."""
    return (torch.compiler.is_compiling() and not t.is_floating_point() and not extras.aux
            and x.dtype in (torch.float32, torch.bfloat16))


class Options(NamedTuple):
    n_classes: int
    ignore_index: int
    label_smoothing: float
    reduction: str
    backend: str
    chunk_size: Optional[int]
    logit_scale: float
    softcap: Optional[float]
    lse_square_scale: float
    loss_shape: tuple


# ``linear._fused``, the eager loss of checked arguments: set by ``fusedce.linear``, which
# imports this module (so that this one needs no import of it)
EAGER_LOSS = None


def _eager(x, w, b, t, weight, opts, needs, dloss=None):
    """The eager loss of the checked arguments and the gradients ``needs`` asks for (of
    ``dloss`` for 'none', of 1 for 'mean' / 'sum'), empty where not asked for."""
    leaves = [v.detach().requires_grad_(need) if v is not None else None
              for v, need in zip((x, w, b), needs)]
    extras = _args.Extras(opts.logit_scale, opts.softcap, opts.lse_square_scale, False)
    with torch.enable_grad():
        loss = EAGER_LOSS(*leaves, t, weight, opts.n_classes, opts.ignore_index,
                      opts.label_smoothing, opts.reduction, opts.backend, opts.chunk_size,
                      extras, tuple(opts.loss_shape))[0]
        wanted = [v for v, need in zip(leaves, needs) if need]
        grads = iter(torch.autograd.grad(loss, wanted, dloss) if wanted else ())
    return loss.detach(), [next(grads) if need else x.new_empty(0) for need in needs]


def _fake_grads(x, w, b, needs):
    """The gradients' metadata: contiguous, as the eager loss makes them, whatever the
    strides of their leaves (a transposed tied embedding)."""
    return [torch.empty_like(v, memory_format=torch.contiguous_format) if need
            else x.new_empty(0) for v, need in zip((x, w, b), needs)]


@torch.library.custom_op("fusedce::linear_ce", mutates_args=())
def linear_ce_op(x: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, weight: Optional[Tensor],
                 n_classes: int, ignore_index: int, label_smoothing: float, reduction: str,
                 backend: str, chunk_size: Optional[int], logit_scale: float,
                 softcap: Optional[float], lse_square_scale: float, loss_shape: list[int],
                 need_x: bool, need_w: bool, need_b: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, dx, dw, db)``: the loss in its accumulation dtype and, for 'mean' / 'sum',
    the gradients of upstream 1 asked for (for 'none' none: empty)."""
    opts = Options(n_classes, ignore_index, label_smoothing, reduction, backend, chunk_size,
                   logit_scale, softcap, lse_square_scale, tuple(loss_shape))
    needs = (need_x, need_w, need_b) if reduction != "none" else (False, False, False)
    loss, grads = _eager(x, w, b, t, weight, opts, needs)
    return loss, *grads


@linear_ce_op.register_fake
def _(x, w, b, t, weight, n_classes, ignore_index, label_smoothing, reduction, backend,
      chunk_size, logit_scale, softcap, lse_square_scale, loss_shape, need_x, need_w, need_b):
    acc = _loss.acc_dtype(x, t, weight)
    loss = x.new_empty(() if reduction != "none" else tuple(loss_shape), dtype=acc)
    needs = (need_x, need_w, need_b) if reduction != "none" else (False, False, False)
    return loss, *_fake_grads(x, w, b, needs)


@torch.library.custom_op("fusedce::linear_ce_grad", mutates_args=())
def linear_ce_grad_op(dloss: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor,
                      weight: Optional[Tensor], n_classes: int, ignore_index: int,
                      label_smoothing: float, backend: str, chunk_size: Optional[int],
                      logit_scale: float, softcap: Optional[float], lse_square_scale: float,
                      loss_shape: list[int], need_x: bool, need_w: bool, need_b: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)`` of 'none' for the upstream ``dloss`` (empty where not asked for)."""
    opts = Options(n_classes, ignore_index, label_smoothing, "none", backend, chunk_size,
                   logit_scale, softcap, lse_square_scale, tuple(loss_shape))
    return tuple(_eager(x, w, b, t, weight, opts, (need_x, need_w, need_b), dloss)[1])


@linear_ce_grad_op.register_fake
def _(dloss, x, w, b, t, weight, n_classes, ignore_index, label_smoothing, backend, chunk_size,
      logit_scale, softcap, lse_square_scale, loss_shape, need_x, need_w, need_b):
    return tuple(_fake_grads(x, w, b, (need_x, need_w, need_b)))


def loss_only(x, w, b, t, weight, opts):
    """The loss, no gradient (no_grad, evaluation): one op."""
    return linear_ce_op(x, w, b, t, weight, *opts[:-1], list(opts.loss_shape), False, False,
                        False)[0]


def forward(ctx, x, w, b, t, weight, opts):
    """``LinearCrossEntropyFunction.forward`` while compiling: the op, and what the
    backward needs saved (the gradients of upstream 1 for 'mean' / 'sum', else the inputs)."""
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             b is not None and ctx.needs_input_grad[2])
    loss, dx, dw, db = linear_ce_op(x, w, b, t, weight, *opts[:-1], list(opts.loss_shape),
                                    *needs)
    ctx.compiled, ctx.needs, ctx.n_rows = opts, needs, x.shape[0]
    if opts.reduction == "none":
        ctx.save_for_backward(x, w, b, t, weight)
    else:
        ctx.save_for_backward(dx, dw, db, t)
    return loss


def backward(ctx, grad):
    """``LinearCrossEntropyFunction.backward`` while compiling: ``(dx, dw, db)``."""
    opts, needs = ctx.compiled, ctx.needs
    if opts.reduction == "none":
        x, w, b, t, weight = ctx.saved_tensors
        grads = linear_ce_grad_op(grad, x, w, b, t, weight, opts.n_classes, opts.ignore_index,
                                  opts.label_smoothing, opts.backend, opts.chunk_size,
                                  opts.logit_scale, opts.softcap, opts.lse_square_scale,
                                  list(opts.loss_shape), *needs)
    else:
        dx, dw, db, t = ctx.saved_tensors
        # ignored rows stay 0 under an inf or NaN upstream, as in eager mode
        g, g_rows = _loss.upstream_of_kept_rows(t, opts.ignore_index, grad, ctx.n_rows)
        grads = ((dx.float() * g_rows).to(dx.dtype) if needs[0] else None,
                 (dw.float() * g).to(dw.dtype) if needs[1] else None,
                 (db.float() * g).to(db.dtype) if needs[2] else None)
    return tuple(g if need else None for g, need in zip(grads, needs))
