"""The one autograd route of ``fusedce.cross_entropy``: ``CrossEntropyFunction``, which eager
mode and ``torch.compile`` both run.

Its forward and backward call ``fusedce._loss.forward`` / ``backward``: directly in eager mode
(no dispatcher cost per call), and through the ``torch.library`` ops ``fusedce::ce_forward``
/ ``fusedce::ce_backward`` while compiling, so that Dynamo sees two opaque operators with
known output shapes (no graph break) and AOTAutograd takes the backward from this Function.
The ops carry no autograd formula of their own.

In eager mode the gradient may also be computed in the forward (``mode``): into a reused
buffer (``"forward"``, the CPU path's default: one read of the logits for loss and
gradient) or over the logits themselves (``"inplace"``, ``inplace_backward=True``); the
backward then only rescales rows whose upstream gradient is not 1.

Importing this module needs neither Triton nor a GPU.
"""

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch._C import _functorch

from . import _args, _higher, _loss

INPLACE_DOUBLE_BACKWARD_ERROR = (
    "fusedce.cross_entropy(inplace_backward=True) does not support double backward "
    "(create_graph=True followed by a gradient of the gradient): the logits it would be "
    "taken from were overwritten by the gradient. Use inplace_backward=False.")

def no_graph_in_inference_mode(fn):
    """Runs the loss ``fn`` under no_grad when inference mode is on with grad mode on:
    there PyTorch's own ops record no graph, and an autograd Function would try to save
    inference tensors, and raise (not while compiling: Dynamo cannot trace the check)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if (not torch.compiler.is_compiling() and torch.is_grad_enabled()
                and torch.is_inference_mode_enabled()):
            with torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


INPLACE_SECOND_BACKWARD_ERROR = (
    "fusedce.cross_entropy(inplace_backward=True): the gradient was written over the logits "
    "in the forward and handed to autograd by the first backward; a second backward through "
    "the same graph (retain_graph=True) is not supported. Use inplace_backward=False.")


class _DoubleBackwardError(torch.autograd.Function):
    """Identity on ``grad`` in the graph of ``anchor``, whose backward raises."""

    @staticmethod
    def forward(ctx, grad, anchor):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(INPLACE_DOUBLE_BACKWARD_ERROR)


def differentiable_gradients(loss_fn, inputs, needs, grad):
    """Under ``create_graph=True``: the gradients of ``loss_fn()`` (the loss recomputed by
    ``fusedce._higher`` from the saved ``inputs``) with respect to those ``inputs`` whose
    ``needs`` is set, given the upstream ``grad``, as tensors autograd can differentiate
    again (in the inputs and in ``grad``). None where not needed."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        loss = loss_fn()
        grads = iter(torch.autograd.grad(loss, wanted, grad.to(loss.dtype),
                                         create_graph=True, allow_unused=True))
    out = []
    for t, need in zip(inputs, needs):
        g = next(grads) if need else None
        out.append(torch.zeros_like(t) if need and g is None else g)
    return out


def batched(grad):
    """Whether ``grad`` is batched: a vmap over the backward (``torch.autograd.grad``'s
    ``is_grads_batched``, the vectorised ``jacobian`` / ``hessian`` of
    ``torch.autograd.functional``, gradcheck's batched checks). A batched tensor has no
    data for the fused passes to read, nor a value to test. (Not while compiling: Dynamo,
    which traces the backward, cannot trace the test, and the upstream gradients of a
    compiled backward are plain tensors.)"""
    if torch.compiler.is_compiling():
        return False
    return _functorch.is_legacy_batchedtensor(grad) or _functorch.is_batchedtensor(grad)


def higher_order(backward):
    """Decorates CrossEntropyFunction's backward: the fused backward, without a graph, for
    a first-order gradient (a batched one by PyTorch ops: ``_rows_grad``); under
    ``create_graph=True`` the differentiable formulation (``_differentiable_backward``),
    except after an in-place forward, whose logits are gone:
    there each gradient is tied to ``x`` through a node that raises
    INPLACE_DOUBLE_BACKWARD_ERROR, so a gradient of the gradient fails loudly."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        def first_order():  # the gradient without a graph
            if batched(grads[0]) and (ctx.opts.mode == "backward" or (
                    ctx.opts.mode == "forward" and ctx.consumed)):
                # a batched upstream gradient (``batched``) where nothing was computed in
                # the forward: the differentiable formulation, whose ops batch
                return _differentiable_backward(ctx, grads[0])
            return backward(ctx, *grads)

        if not (torch.is_grad_enabled() and any(ctx.needs_input_grad)):
            with torch.no_grad():
                return first_order()
        if ctx.opts.mode != "inplace":
            return _differentiable_backward(ctx, grads[0])
        if ctx.consumed:
            raise RuntimeError(INPLACE_SECOND_BACKWARD_ERROR)
        if batched(grads[0]):
            # under a vmap over the backward the raising node's output came back without
            # a graph (a gradient of it failed on "does not require grad"): refuse it here
            raise RuntimeError(INPLACE_DOUBLE_BACKWARD_ERROR)
        anchor = ctx.saved_tensors[0]  # before the backward bumps its version
        with torch.no_grad():
            outputs = first_order()
        return tuple(_DoubleBackwardError.apply(v, anchor) if isinstance(v, torch.Tensor)
                     else v for v in outputs)

    return wrapper


def _differentiable_backward(ctx, grad_loss):
    """CrossEntropyFunction's gradients under ``create_graph=True``, from ``fusedce._higher``
    over the saved logits (and probability targets)."""
    opts = ctx.opts
    x, target, weight = ctx.saved_tensors[:3]
    if opts.mode != "backward":  # the row modes saved the targets flattened
        target = target.view(x.shape[0], x.shape[2])
        # the gradient computed in the forward: not this backward's, nor a later one's (a
        # gradient penalty backpropagates through the loss again: recompute it there)
        ctx.grad = None
        ctx.consumed = True
    needs = (ctx.needs_input_grad[0],
             ctx.needs_input_grad[1] and target.is_floating_point())

    def loss():
        return _higher.cross_entropy(x, target, weight, opts.ignore_index,
                                     opts.label_smoothing, opts.reduction, opts.extras)[0]

    dx, dy = differentiable_gradients(loss, (x, target), needs, grad_loss)
    return dx, dy, None, None


# ------------------------------------------------------------------------------------------
# The ops torch.compile sees


@torch.library.custom_op("fusedce::ce_forward", mutates_args=())
def ce_forward_op(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                  label_smoothing: float, reduction: str, backend: str, validate: bool,
                  logit_scale: float, softcap: Optional[float], lse_square_scale: float,
                  aux: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, s, denom, aux)`` of ``x`` (N, C, L); see ``_loss.forward``."""
    return _loss.forward(x, target, weight, ignore_index, label_smoothing, reduction, backend,
                         validate, _args.Extras(logit_scale, softcap, lse_square_scale, aux))


@ce_forward_op.register_fake
def _(x, target, weight, ignore_index, label_smoothing, reduction, backend, validate,
      logit_scale, softcap, lse_square_scale, aux):
    n, _, l_len = x.shape
    acc = _loss.acc_dtype(x, target, weight)
    loss = x.new_empty((n, l_len) if reduction == "none" else (), dtype=acc)
    lse = x.new_empty((n * l_len,), dtype=torch.float64)
    s = x.new_empty((n * l_len,) if target.is_floating_point() else (0,), dtype=acc)
    denom = x.new_empty((1,), dtype=acc)
    aux_out = x.new_empty((2, n * l_len) if aux else (0,), dtype=acc)
    return loss, lse, s, denom, aux_out


@torch.library.custom_op("fusedce::ce_backward", mutates_args=())
def ce_backward_op(grad: Tensor, x: Tensor, target: Tensor, weight: Optional[Tensor],
                   lse: Tensor, s: Tensor, denom: Tensor, ignore_index: int,
                   label_smoothing: float, reduction: str, backend: str, need_dx: bool,
                   need_dtarget: bool, logit_scale: float, softcap: Optional[float],
                   lse_square_scale: float) -> tuple[Tensor, Tensor]:
    """``(dx, dtarget)``; see ``_loss.backward``. An entry not asked for is empty."""
    return _loss.backward(grad, x, target, weight, lse, s, denom, ignore_index,
                          label_smoothing, reduction, backend, need_dx, need_dtarget,
                          _args.Extras(logit_scale, softcap, lse_square_scale))


@ce_backward_op.register_fake
def _(grad, x, target, weight, lse, s, denom, ignore_index, label_smoothing, reduction, backend,
      need_dx, need_dtarget, logit_scale, softcap, lse_square_scale):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    soft = target.is_floating_point()
    dy = torch.empty_like(target) if (need_dtarget and soft) else target.new_empty(0)
    return dx, dy


# ------------------------------------------------------------------------------------------
# The autograd Function


class Options(NamedTuple):
    """cross_entropy's checked options, as the Function takes them."""

    ignore_index: int
    label_smoothing: float
    reduction: str
    backend: str
    validate: bool
    mode: str = "backward"  # where the gradient is computed: "backward", "forward", "inplace"
    extras: _args.Extras = _args.NO_EXTRAS


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of ``x`` (N, C, L) against ``target`` ((N, L) class indices or (N, C, L)
    probabilities), reduced as ``opts.reduction`` says; differentiable in ``x`` and in
    probability targets.

    ``opts.mode`` "forward" and "inplace" (eager mode only; class-index targets, rows of
    ``x`` contiguous) compute the gradient of the reduced loss in the forward, with
    ``1 / denominator`` folded in. The backward hands it to autograd after rescaling rows
    whose upstream gradient is not 1. A second backward through a retained graph recomputes
    it from the saved logits ("forward"), or raises ("inplace": they are gone).

    With ``opts.extras.aux`` it returns ``(loss, lse, aux)``, the last two (the per-row
    log-sum-exp and ``_loss.forward``'s aux) not differentiable.
    """

    @staticmethod
    def forward(ctx, x, target, weight, opts):
        ctx.opts = opts
        extras = opts.extras
        if opts.mode == "backward":
            if torch.compiler.is_compiling():
                out = ce_forward_op(x, target, weight, opts.ignore_index, opts.label_smoothing,
                                    opts.reduction, opts.backend, opts.validate, *extras)
            else:
                out = _loss.forward(x, target, weight, opts.ignore_index, opts.label_smoothing,
                                    opts.reduction, opts.backend, opts.validate, extras)
            loss, lse, s, denom, aux = out
            ctx.save_for_backward(x, target, weight, lse, s, denom)
            return _outputs(ctx, loss, lse, aux)
        rows, t = _loss.rows_view(x), target.reshape(-1).contiguous()
        if opts.validate:
            _loss.check_targets(t, x.shape[1], opts.ignore_index)
        impl = _args.implementation(opts.backend, x)
        denom = _loss.denominator(t, weight, opts.ignore_index, x.shape[1], opts.reduction)
        inplace = opts.mode == "inplace"
        grad = rows if inplace else impl.grad_buffer(rows)
        aux = rows.new_empty((2, rows.shape[0]) if extras.aux else (0,), dtype=torch.float32)
        z_scale = None
        if extras.z_loss:
            z_scale = (2.0 * extras.lse_square_scale) / _loss.z_denominator(
                t, opts.ignore_index, opts.reduction, torch.float32)
        loss, lse = impl.ce_fwd(rows, t, weight, opts.ignore_index, opts.label_smoothing,
                                grad_scale=1.0 / denom, grad_out=None if inplace else grad,
                                extras=extras, aux_out=aux if extras.aux else None,
                                z_scale=z_scale)
        if inplace:
            # A Triton store does not bump the version counter: do it, so that a node which
            # saved the logits (e.g. tanh's output) raises instead of reading the gradient.
            torch.autograd.graph.increment_version(x)
            ctx.save_for_backward(x, t)
        else:
            ctx.save_for_backward(x, t, weight, lse, denom)  # for a second backward
            ctx.grad = grad  # held until the backward hands it over (or the graph is freed)
            # what the first backward reads, without unpacking the saved logits: they may
            # be changed in place after the loss, as PyTorch's loss (which saves its
            # log-softmax) allows; the targets are checked as a saved tensor would be
            ctx.first = (t, t._version)
        ctx.x_shape = x.shape
        ctx.impl = impl
        ctx.consumed = False
        shape = (x.shape[0], x.shape[2])
        loss = _loss.reduce(loss.view(shape), denom, opts.reduction)
        if extras.z_loss:
            loss = _loss.add_z_loss(loss, lse, t, opts.ignore_index, opts.reduction, extras,
                                    shape)
        return _outputs(ctx, loss, lse, aux)

    @staticmethod
    @higher_order
    def backward(ctx, grad_loss, *_aux_grads):
        opts = ctx.opts
        if opts.mode == "backward":
            x, target, weight, lse, s, denom = ctx.saved_tensors
            need_dx = ctx.needs_input_grad[0]
            need_dtarget = ctx.needs_input_grad[1] and target.is_floating_point()
            if not (need_dx or need_dtarget):
                return None, None, None, None
            args = (grad_loss, x, target, weight, lse, s, denom, opts.ignore_index,
                    opts.label_smoothing, opts.reduction, opts.backend, need_dx, need_dtarget)
            if torch.compiler.is_compiling():
                dx, dy = ce_backward_op(*args, *opts.extras[:3])
            else:
                dx, dy = _loss.backward(*args, opts.extras)
            return dx if need_dx else None, dy if need_dtarget else None, None, None
        return _rows_grad(ctx, grad_loss), None, None, None


def _outputs(ctx, loss, lse, aux):
    """The Function's outputs: the loss, and with aux outputs the lse and aux too (not
    differentiable)."""
    if not ctx.opts.extras.aux:
        return loss
    ctx.mark_non_differentiable(lse, aux)
    return loss, lse, aux


def _rows_grad(ctx, grad_loss):
    """The backward of the modes that computed the gradient in the forward."""
    opts = ctx.opts
    if opts.mode == "inplace" and ctx.consumed:
        raise RuntimeError(INPLACE_SECOND_BACKWARD_ERROR)
    if opts.mode == "forward" and not ctx.consumed:
        t, version = ctx.first
        if t._version != version:
            raise RuntimeError("one of the variables needed for gradient computation has been "
                               "modified by an inplace operation: the target of "
                               "fusedce.cross_entropy")
        x = None
    else:
        x, t = ctx.saved_tensors[:2]
    n_rows = t.shape[0]
    if opts.reduction == "none":
        dloss = grad_loss.float().reshape(-1)  # may be an expanded scalar: stride 0 honoured
    else:
        dloss = grad_loss.float().reshape(1).expand(n_rows)
    if not ctx.consumed:
        # An ignored row's gradient is 0 whatever its upstream gradient, also an infinite
        # one (d sqrt(loss) at loss 0): its stored zeros get the factor 1, which ``ce_scale_``
        # skips, not the upstream (0 * inf would be NaN). (In int64: a uint8 target would
        # compare -100 as 156.)
        dloss = torch.where(t.long() == opts.ignore_index, 1.0, dloss)
        ctx.consumed = True  # a second backward would rescale the gradient again
        if batched(grad_loss):
            # a vmap over the backward: the stored gradient is each row's for an upstream
            # gradient of 1, and linear in it; PyTorch ops (which batch) scale it
            rows = ctx.grad if opts.mode == "forward" else _loss.rows_view(x)
            ctx.grad = None
            dx = (rows.float() * dloss[:, None]).to(rows.dtype)
        elif opts.mode == "inplace":
            dx = ctx.impl.ce_scale_(_loss.rows_view(x), dloss)  # denom is in already
            torch.autograd.graph.increment_version(x)
        else:
            dx = ctx.impl.ce_scale_(ctx.grad, dloss)
            ctx.grad = None
        return _loss.from_rows(dx, ctx.x_shape)
    x, t, weight, lse, denom = ctx.saved_tensors
    extras = opts.extras
    zg = (_loss.z_grad(grad_loss, lse, t, opts.ignore_index, opts.reduction, extras)
          if extras.z_loss else None)
    dx = ctx.impl.ce_bwd(_loss.rows_view(x), t, lse, dloss / denom,
                         weight=weight, ignore_index=opts.ignore_index,
                         label_smoothing=opts.label_smoothing, extras=extras, z_grad=zg)
    return _loss.from_rows(dx, ctx.x_shape)
