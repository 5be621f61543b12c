"""The autograd layer over the implementations, and the choice of implementation.

Two families of implementations compute per-row losses and the gradient of a weighted sum
of them:

- row-wise, for class-index targets whose classes are contiguous in memory (the language
  model case): the Triton launchers ``fusedce.kernels.ce_fwd``/``ce_bwd`` and
  ``fusedce._torch_impl``;
- strided, over the class dimension of ``(N, C, L)`` logits of any strides, for
  class-probability targets, for class-index targets whose classes are not contiguous and for
  float64: ``fusedce.kernels.ce_strided_fwd``/``ce_strided_bwd`` and ``fusedce._soft_target``.

This module adds the reduction, whose denominator stays a device tensor (no host sync), and
picks the implementation from the tensors' layout. ``forward`` / ``backward`` here are what the
``torch.library`` custom op (``fusedce._ops``) runs; ``CrossEntropyFunction`` is the
autograd Function of the in-place mode.
"""

import functools

import torch

from . import _soft_target, _torch_impl

DOUBLE_BACKWARD_ERROR = (
    "fusedce.cross_entropy does not support double backward (create_graph=True followed by "
    "a gradient of the gradient): its backward treats the saved log-sum-exp and denominator "
    "as constants, so a second-order result would be wrong. Use "
    "torch.nn.functional.cross_entropy for higher-order gradients.")

BACKENDS = ("auto", "triton", "torch")


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


def _kernels():
    # Imported on first use so that ``import fusedce`` needs neither Triton nor a GPU.
    from . import kernels

    return kernels


def resolve_backend(backend, x):
    """The row-wise implementation module for ``backend`` and the device of ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    return _kernels() if backend == "triton" else _torch_impl


def _strided_impl(backend, x):
    """The strided implementation for ``backend`` and the device of ``x``."""
    return _soft_target if resolve_backend(backend, x) is _torch_impl else _kernels()


def acc_dtype(x, target, weight):
    """The dtype the loss is computed in: float64 if any operand is float64, else float32."""
    soft = target.is_floating_point()
    return _soft_target.acc_dtype(x.dtype, target.dtype if soft else x.dtype,
                                  weight.dtype if weight is not None else x.dtype)


def denominator(target, weight, ignore_index, n_cols, reduction, dtype=torch.float32):
    """The divisor of the summed loss, as a device tensor of shape (1,).

    'mean' divides by the summed class weights of the rows not ignored (PyTorch's weighted
    mean; with no weights, their count), so all rows ignored gives 0 / 0 = NaN as in PyTorch.
    For class-probability targets PyTorch divides by the number of rows, weights or not.
    """
    device = target.device
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=device)
    if target.is_floating_point():  # (N, C, L) probabilities: N * L rows
        return torch.full((1,), float(target.numel() // max(n_cols, 1)) if n_cols else 0.0,
                          dtype=dtype, device=device)
    # int64: compared with a uint8 target, -100 would wrap to 156 and drop class 156's rows
    target = target.reshape(-1).long()
    kept = target != ignore_index
    if weight is None:
        return kept.sum(dtype=dtype).reshape(1)
    in_range = kept & (target >= 0) & (target < n_cols)
    w_t = weight.to(dtype)[torch.where(in_range, target, 0)]
    return torch.where(in_range, w_t, 0.0).sum().reshape(1)


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
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def first_order_only(backward):
    """Decorates an autograd Function's backward (whose first saved tensor is the input
    ``x``) like ``torch.autograd.function.once_differentiable``: it runs without building a
    graph, and under ``create_graph=True`` each gradient it returns is tied to ``x`` through
    a node that raises DOUBLE_BACKWARD_ERROR, so a gradient of the gradient fails loudly
    (once_differentiable's node hangs off a detached copy: ``torch.autograd.grad`` of it
    with respect to ``x`` would report the input unused instead)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        # (not after an in-place backward, whose second call raises anyway and whose x
        # holds the gradient by then)
        create_graph = (torch.is_grad_enabled() and any(ctx.needs_input_grad)
                        and not (getattr(ctx, "inplace", False)
                                 and getattr(ctx, "consumed", False)))
        # read before the backward: the in-place mode's backward bumps x's version
        anchor = ctx.saved_tensors[0] if create_graph else None
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not create_graph:
            return outputs
        return tuple(_DoubleBackwardError.apply(v, anchor) if isinstance(v, torch.Tensor)
                     else v for v in outputs)

    return wrapper


def rows_view(x):
    """``x`` (N, C, L) as a (N * L, C) view with unit class stride, or None if impossible."""
    n, n_cols, l_len = x.shape
    if x.stride(1) != 1:
        return None
    if l_len == 1:
        return x.squeeze(2)  # a view whose backward is a view too (select_backward copies)
    if n == 1:
        return x.squeeze(0).t()
    if x.stride(0) == l_len * x.stride(2):
        return x.transpose(1, 2).reshape(n * l_len, n_cols)
    return None


def use_rows(x, target, weight):
    """Whether the row-wise implementation serves ``x`` (N, C, L): class indices, classes
    contiguous, rows one stride apart, and no float64 operand (float64 is computed in
    float64 by the strided implementation, as PyTorch would)."""
    return (not target.is_floating_point() and acc_dtype(x, target, weight) == torch.float32
            and rows_view(x) is not None)


def check_targets(target, n_cols, ignore_index):
    """Raise PyTorch's IndexError for a class index outside ``[0, C)`` (host sync)."""
    t = target.reshape(-1).long()  # int64, as in ``denominator``
    bad = (t != ignore_index) & ((t < 0) | (t >= n_cols))
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")


def forward(x, target, weight, ignore_index, label_smoothing, reduction, backend, validate):
    """Reduced loss of ``x`` (N, C, L) against ``target`` ((N, L) indices or (N, C, L)
    probabilities). Returns ``(loss, lse, s, denom)``: loss (N, L) for 'none' else a scalar,
    in the accumulation dtype; lse and s (O(rows) state for the backward); denom (1,)."""
    n, n_cols, l_len = x.shape
    soft = target.is_floating_point()
    acc = acc_dtype(x, target, weight)
    if validate and not soft:
        check_targets(target, n_cols, ignore_index)
    if use_rows(x, target, weight):
        impl = resolve_backend(backend, x)
        loss, lse = impl.ce_fwd(rows_view(x), target.reshape(-1).contiguous(), weight=weight,
                                ignore_index=ignore_index, label_smoothing=label_smoothing)
        s = lse.new_empty(0)
    else:
        impl = _strided_impl(backend, x)
        loss, lse, s = impl.ce_strided_fwd(x, target, weight=weight, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing)
    denom = denominator(target, weight, ignore_index, n_cols, reduction, dtype=acc)
    if reduction == "none":
        loss = loss.view(n, l_len)
    else:
        loss = loss.sum()
        if reduction == "mean":
            loss = loss / denom[0]
    return loss, lse, s, denom


def backward(grad, x, target, weight, lse, s, denom, ignore_index, label_smoothing, reduction,
             backend, need_dx, need_dtarget):
    """Gradients ``(dx, dtarget)`` of the loss from ``forward``, given its upstream gradient
    ``grad`` ((N, L) for 'none', else a scalar). ``dx`` is laid out like ``torch.empty_like(x)``;
    an entry not asked for is an empty tensor."""
    n, n_cols, l_len = x.shape
    acc = lse.dtype
    if reduction == "none":
        dloss = grad.to(acc)
    else:
        # one scalar for all rows, broadcast with stride 0 (no (N, L) tensor is made)
        dloss = grad.to(acc).reshape(1)
        if reduction == "mean":
            dloss = dloss / denom
        dloss = dloss.reshape(1, 1).expand(n, l_len)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dy = target.new_empty(0)
    dx_rows = rows_view(dx) if need_dx and use_rows(x, target, weight) else None
    if dx_rows is not None:
        impl = resolve_backend(backend, x)
        impl.ce_bwd(rows_view(x), target.reshape(-1).contiguous(), lse, dloss.reshape(-1),
                    weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                    dx=dx_rows)
        return dx, dy
    if need_dx or need_dtarget:
        impl = _strided_impl(backend, x)
        dx_out, dy_out = impl.ce_strided_bwd(
            x, target, lse, s, dloss, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, dx=dx if need_dx else None, need_dx=need_dx,
            need_dtarget=need_dtarget and target.is_floating_point())
        if dy_out is not None:
            dy = dy_out
    return dx, dy


class CrossEntropyFunction(torch.autograd.Function):
    """Reduced cross-entropy of ``x`` (rows, C) against class indices ``target`` (rows,) whose
    gradient is computed in the forward (row-wise implementations only).

    The forward computes the gradient of the reduced loss (``1 / denominator`` folded in)
    in the same pass as the loss: over ``x`` itself with ``inplace=True`` (the
    ``inplace_backward`` mode), else into a buffer from the CPU implementation's gradient
    cache (the CPU's default mode: one read of the logits for loss and gradient, and no
    fresh logits-sized allocation to fault in). The backward only rescales rows whose
    upstream gradient differs from 1 and hands the gradient to autograd. A second backward
    through a retained graph recomputes the gradient from the saved logits (not possible
    in place: it raises). The caller (``fusedce.functional``) applies it only when ``x``
    will get a gradient.
    """

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, label_smoothing, reduction, impl,
                inplace=True):
        denom = denominator(target, weight, ignore_index, x.shape[1], reduction)
        dx, fresh = (x, False) if inplace else _torch_impl.grad_buffer(x)
        loss, lse = impl.ce_fwd(x, target, weight=weight, ignore_index=ignore_index,
                                label_smoothing=label_smoothing, inplace_scale=1.0 / denom,
                                **({} if inplace else {"grad_out": dx, "fault_in": fresh}))
        if inplace:
            # A Triton store does not bump the version counter: do it, so that a node which
            # saved the logits (e.g. tanh's output) raises instead of reading the gradient.
            torch.autograd.graph.increment_version(x)
            ctx.save_for_backward(x, target)
        else:
            ctx.save_for_backward(x, target, weight, lse, denom)
            ctx.dx = dx  # held until the backward hands it over (or the graph is freed)
        ctx.options = (ignore_index, label_smoothing)
        ctx.impl = impl
        ctx.reduction = reduction
        ctx.inplace = inplace
        ctx.consumed = False
        if reduction == "none":
            return loss
        total = loss.sum()
        if reduction == "mean":
            total = total / denom[0]
        return total

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        if ctx.inplace and ctx.consumed:
            raise RuntimeError(INPLACE_SECOND_BACKWARD_ERROR)
        x, target = ctx.saved_tensors[:2]
        ignore_index, label_smoothing = ctx.options
        if ctx.reduction == "none":
            dloss = grad_out.float()  # may be an expanded scalar: its stride 0 is honoured
        else:
            dloss = grad_out.float().reshape(1).expand(x.shape[0])
        if not ctx.consumed:
            # An ignored row's gradient is 0 whatever its upstream gradient, also an infinite
            # one (d sqrt(loss) at loss 0): its stored zeros get the factor 1, which
            # ``ce_scale_`` skips, not the upstream (0 * inf would be NaN).
            # (in int64: a uint8 target would compare -100 as 156)
            dloss = torch.where(target.long() == ignore_index, 1.0, dloss)
            ctx.consumed = True  # a second backward would rescale the gradient again
            if ctx.inplace:
                dx = ctx.impl.ce_scale_(x, dloss)  # the forward already divided by denom
                torch.autograd.graph.increment_version(x)
            else:
                dx = ctx.impl.ce_scale_(ctx.dx, dloss)
                ctx.dx = None
            return (dx,) + (None,) * 7
        x, target, weight, lse, denom = ctx.saved_tensors
        dx = ctx.impl.ce_bwd(x, target, lse, dloss / denom, weight=weight,
                             ignore_index=ignore_index, label_smoothing=label_smoothing)
        return (dx,) + (None,) * 7
