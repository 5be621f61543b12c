"""Fused linear + cross-entropy: the loss of ``hidden @ W.T (+ b)`` without the full logits.

``fusedce.linear_cross_entropy`` is a drop-in for ``torch.nn.functional.linear_cross_entropy``.
The tokens are processed in chunks of ``R`` rows; for each chunk::

    logits  = x_c @ W.T (+ b)                      (R, V), written into one reused buffer
    loss_c, dlogits = fused CE over the buffer     the gradient overwrites the logits
    dx_c    = dlogits @ W                          (R, H)
    dW     += dlogits.T @ x_c                      (V, H), accumulated in fp32
    db     += sum_rows(dlogits)                    (V,),   accumulated in fp32

so the largest temporary is one chunk's logits, ``R x V``, instead of ``N x V`` (and its
gradient). The fused CE is ``ce_fwd(..., grad_scale=1/denominator)`` of the Triton
launchers (CUDA tensors) or of :mod:`fusedce.cpu` (CPU tensors): it computes the loss
and the logit gradient in one pass. The reduction's denominator (the weighted count of rows
not ignored) is computed from the targets before the first chunk, on the device.

Scalar reductions ('mean', 'sum') compute the gradients during the forward; the backward only
multiplies them by the upstream scalar. ``reduction='none'`` cannot do that (a per-token
upstream gradient does not factor out of ``dlogits.T @ x``): its forward keeps the per-row
log-sum-exp, and its backward recomputes each chunk's logits and runs the CE backward on them.
"""

import functools
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import _args, _autograd, _dtensor, _higher, _linear_compile, _loss
from ._chunks import MAX_CHUNK_BYTES, GradAccumulator, chunk_rows, logits_into  # noqa: F401

# (chunk_rows, GradAccumulator and MAX_CHUNK_BYTES stay importable from here, where they were)


def _chunks(n_rows, rows):
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


class _ChunkLoss:
    """The cross-entropy of one chunk of logits, (R, C * L) as the product makes them, whose
    classes are ``n_classes`` of L positions each (``L`` > 1 for a K-dimensional weight).

    Class indices in float32 over whole rows (the language-model case) take the row-wise
    launchers, which write the gradient over the logits in the pass that computes the loss;
    everything else (probability targets, K-dimensional weights, a float64 operand) takes
    ``_loss.forward`` / ``backward`` over the (R, C, L) view, a second pass for the gradient.
    ``t`` is (N, L) class indices or (N, C, L) probabilities; every per-row result is
    (R * L,) in the dtype the loss is computed in.
    """

    def __init__(self, x, t, weight, n_classes, ignore_index, label_smoothing, backend,
                 extras):
        self.t, self.weight, self.n_classes = t, weight, n_classes
        self.options = (ignore_index, label_smoothing)
        self.backend, self.extras = backend, extras
        self.soft = t.is_floating_point()
        self.positions = t.shape[-1]
        self.acc = _loss.acc_dtype(x, t, weight)
        # (no class: _loss.forward's own rows, not a launcher's)
        self.rows = (not self.soft and self.positions == 1 and self.acc == torch.float32
                     and n_classes > 0)
        if self.rows:
            self.t = t.reshape(-1).contiguous()  # the kernels read target[row] at unit stride
            self.impl = (_loss.extras_implementation(backend, x, t, weight) if extras.any
                         else _args.implementation(backend, x))

    def target_grad_buffer(self):
        """The probability targets' gradient, summed in the dtype the loss is computed in
        (a 16-bit gradient would be rounded once more by the upstream gradient)."""
        return torch.empty_like(self.t, dtype=self.acc)

    def _targets(self, s, e):
        """Rows ``s:e`` of the targets; 16-bit probabilities read in the loss's dtype, so
        that their gradient is computed in it too (a chunk-sized copy)."""
        return self.t[s:e].to(self.acc) if self.soft else self.t[s:e]

    def view(self, logits):
        return logits.view(logits.shape[0], self.n_classes, self.positions)

    def forward(self, logits, s, e, aux=None, grad=None, dtarget=None):
        """``(loss, lse, s_sums)`` of rows ``s:e``; with ``grad`` (a ``ForwardGrad``) the
        logits are overwritten by the gradient of the chunk's share of the reduced loss
        (and ``dtarget[s:e]`` written, where given), times ``grad.stored``."""
        ignore_index, smoothing = self.options
        t_c = self._targets(s, e)
        if self.rows:
            loss, lse = self.impl.ce_fwd(logits, t_c, weight=self.weight,
                                         ignore_index=ignore_index, label_smoothing=smoothing,
                                         grad_scale=None if grad is None else grad.scale,
                                         extras=self.extras, aux_out=aux,
                                         z_scale=None if grad is None else grad.z_scale)
            return loss, lse, None
        x3 = self.view(logits)
        # the z-loss is added once, over all rows (``_reduced``)
        loss, lse, sums, _, aux_c = _loss.forward(x3, t_c, self.weight, ignore_index,
                                                  smoothing, "none", self.backend, False,
                                                  self.extras, with_z_loss=False)
        if aux is not None:
            aux.copy_(aux_c)
        if grad is not None:
            _, dy = _loss.backward(grad.upstream, x3, t_c, self.weight, lse, sums,
                                   grad.denom, ignore_index, smoothing, "mean", self.backend,
                                   True, dtarget is not None, self.extras, out=x3,
                                   z_denom=grad.z_denom)
            if dtarget is not None:
                dtarget[s:e] = dy
        return loss.reshape(-1), lse, sums

    def backward(self, logits, s, e, lse, sums, dloss, z_grad=None, dtarget=None):
        """Overwrites the chunk's logits by the gradient of ``sum(loss * dloss)`` (dloss
        (N * L,) for all rows), and writes ``dtarget[s:e]`` where given."""
        ignore_index, smoothing = self.options
        t_c = self._targets(s, e)
        rows = slice(s * self.positions, e * self.positions)
        if self.rows:
            self.impl.ce_bwd(logits, t_c, lse[rows], dloss[rows], weight=self.weight,
                             ignore_index=ignore_index, label_smoothing=smoothing, dx=logits,
                             extras=self.extras,
                             z_grad=None if z_grad is None else z_grad[rows])
            return
        x3 = self.view(logits)
        _, dy = _loss.backward(dloss[rows].view(e - s, self.positions), x3, t_c, self.weight,
                               lse[rows], sums[rows] if self.soft else sums, None,
                               ignore_index, smoothing, "none", self.backend, True,
                               dtarget is not None, self.extras, out=x3)
        if dtarget is not None:
            dtarget[s:e] = dy


class ForwardGrad(NamedTuple):
    """What the forward of a 'mean' / 'sum' loss takes its gradients with, computed once per
    call (device tensors: no host sync). ``denom`` (1,): the reduction's denominator;
    ``stored`` (1,) or None: the factor the gradients are stored with; ``scale`` (1,):
    ``stored / denom`` for the row-wise launchers, whose gradient is of ``loss * scale``;
    ``upstream`` (0-d): ``stored`` (or 1) as ``_loss.backward``'s upstream gradient of the
    mean; ``z_scale`` and ``z_denom``: the z-loss's factor (times ``stored``) and divisor."""

    denom: torch.Tensor
    stored: Optional[torch.Tensor]
    scale: torch.Tensor
    upstream: torch.Tensor
    z_scale: Optional[torch.Tensor]
    z_denom: Optional[torch.Tensor]


def _forward_grad(x, ce, reduction):
    """The ``ForwardGrad`` of a call. With float16 and 'mean' the gradients are stored times
    ``2**floor(log2(denom))``: the mean's ``(p - y) / denom`` as the sum's ``(p - y)`` would
    be (within a factor of 2), in float16's normal range, where ``p / denom`` lies below it
    (6e-5) for most classes of a long batch and was flushed to zero before a loss scale
    could lift it. The backward divides it out."""
    ignore_index, _ = ce.options
    denom = _loss.denominator(ce.t, ce.weight, ignore_index, ce.n_classes, reduction, ce.acc)
    stored = None
    if x.dtype == torch.float16 and reduction == "mean":
        stored = torch.exp2(torch.floor(torch.log2(denom)))
    factor = torch.ones(1, dtype=ce.acc, device=x.device) if stored is None else stored
    z_scale = z_denom = None
    if ce.extras.z_loss:
        z_denom = _loss.z_denominator(ce.t, ignore_index, reduction, ce.acc)
        z_scale = (2.0 * ce.extras.lse_square_scale) * factor / z_denom
    return ForwardGrad(denom, stored, factor / denom, factor.reshape(()), z_scale, z_denom)


def _scale_(t, factor, rows=1 << 14):
    """``t *= factor`` (a 0-d fp32 tensor, or one per row of ``t``: (rows, 1)), multiplied in
    fp32 where ``t`` is 16-bit (the factor rounded to fp16 would lose digits or underflow),
    ``rows`` rows at a time."""
    if t.dtype not in (torch.float16, torch.bfloat16):
        return t.mul_(factor.to(t.dtype))
    flat = t.view(t.shape[0], -1) if t.dim() else t.view(1, 1)
    for s in range(0, flat.shape[0], rows):
        part = flat[s:s + rows]
        part.copy_(part.float().mul_(factor if factor.dim() == 0 else factor[s:s + rows]))
    return t


def _logits_buffer(x, n_outputs, rows):
    return torch.empty(min(rows, x.shape[0]), n_outputs, dtype=x.dtype, device=x.device)


def _aux_buffer(x, ce):
    """The (2, rows) entropy and correctness of ``extras.aux``, else None."""
    if not ce.extras.aux:
        return None
    return x.new_empty((2, x.shape[0] * ce.positions), dtype=ce.acc)


def _row_buffers(x, ce):
    """Per-row loss and log-sum-exp, and (probability targets) the sums ``s``; the lse in
    float64, as the launchers give it (a chunk's backward rebuilds ``p`` from it)."""
    n = x.shape[0] * ce.positions
    new = functools.partial(torch.empty, dtype=ce.acc, device=x.device)
    return new(n), new(n, dtype=torch.float64), new(n if ce.soft else 0)


def _loss_only(x, linear_weight, linear_bias, ce, rows, aux=None):
    """Per-row losses, log-sum-exps and sums, one chunk of logits at a time; each row's aux
    into ``aux`` (2, rows) where given."""
    n_rows, positions = x.shape[0], ce.positions
    loss, lse, sums = _row_buffers(x, ce)
    buf = _logits_buffer(x, linear_weight.shape[0], rows)
    for s, e in _chunks(n_rows, rows):
        r = slice(s * positions, e * positions)
        logits = logits_into(buf[:e - s], x[s:e], linear_weight, linear_bias)
        loss[r], lse[r], sums_c = ce.forward(logits, s, e,
                                             aux=None if aux is None else aux[:, r])
        if ce.soft:
            sums[r] = sums_c
    return loss, lse, sums


def _reduced(loss, lse, ce, reduction, loss_shape):
    """The per-row losses reduced, the z-loss of ``ce.extras`` added (reduced the same way);
    'none' shaped as ``loss_shape``."""
    ignore_index, _ = ce.options
    denom = _loss.denominator(ce.t, ce.weight, ignore_index, ce.n_classes, reduction, ce.acc)
    total = _loss.reduce(loss.view(loss_shape), denom, reduction)
    if ce.extras.z_loss:
        total = _loss.add_z_loss(total, lse, ce.t, ignore_index, reduction, ce.extras,
                                 loss_shape)
    return total


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of ``x @ W.T (+ b)`` (x: (N, H), W: (V, H) with V = C * L) against
    ``ce.t`` ((N, L) class indices or (N, C, L) probabilities; ``target`` is the same tensor,
    an input so that probabilities get their gradient).

    'mean' / 'sum': the forward computes the gradients (scaled by 1 / denominator) and keeps
    them; the backward multiplies them in place by the upstream scalar and hands them over,
    so a second backward through the same graph recomputes them as 'none' does. 'none':
    the forward keeps the log-sum-exps; the backward recomputes the logits chunk by chunk.
    Under ``create_graph=True`` the backward is ``fusedce._higher``'s, differentiable.

    With the loss ``extras`` each chunk's CE is of the transformed logits, the z-loss is
    added, and with ``extras.aux`` the outputs are ``(loss, lse, aux)``, the last two not
    differentiable (as ``CrossEntropyFunction``'s).

    While torch.compile traces it, ``ce`` is a ``_linear_compile.Options`` (the class
    ``weight`` given beside it) and forward and backward run the opaque ops of
    ``fusedce/_linear_compile.py``, as ``CrossEntropyFunction`` runs ``fusedce::ce_*``.
    """

    @staticmethod
    def forward(ctx, x, linear_weight, linear_bias, target, weight, ce, reduction, rows,
                loss_shape):
        ctx.compiled = None
        if isinstance(ce, _linear_compile.Options):
            return _linear_compile.forward(ctx, x, linear_weight, linear_bias, target, weight,
                                           ce)
        need_x, need_w, need_b, need_t = ctx.needs_input_grad[:4]
        need_b = need_b and linear_bias is not None
        need_t = need_t and ce.soft
        ctx.options = (ce, reduction, rows)
        ctx.needs = (need_x, need_w, need_b, need_t)
        ctx.loss_shape = loss_shape
        ctx.dtypes = (linear_weight.dtype, None if linear_bias is None else linear_bias.dtype,
                      target.dtype)
        aux = _aux_buffer(x, ce)
        if reduction == "none":
            loss, lse, sums = _loss_only(x, linear_weight, linear_bias, ce, rows, aux)
            ctx.save_for_backward(x, linear_weight, linear_bias, target, lse, sums)
            return _outputs(ctx, _reduced(loss, lse, ce, reduction, loss_shape), lse, aux)

        # 'mean' / 'sum': gradients of loss.sum() / denom (and of the z-loss), computed now
        grad = _forward_grad(x, ce, reduction)
        acc = GradAccumulator(x, linear_weight, need_x, need_w, need_b)
        dtarget = ce.target_grad_buffer() if need_t else None
        loss, lse, sums = _row_buffers(x, ce)
        positions = ce.positions
        buf = _logits_buffer(x, linear_weight.shape[0], rows)
        for s, e in _chunks(x.shape[0], rows):
            r = slice(s * positions, e * positions)
            x_c = x[s:e]
            logits = logits_into(buf[:e - s], x_c, linear_weight, linear_bias)
            loss[r], lse[r], sums_c = ce.forward(logits, s, e,
                                                 aux=None if aux is None else aux[:, r],
                                                 grad=grad, dtarget=dtarget)
            if ce.soft:
                sums[r] = sums_c
            acc.add(logits, x_c, s, e)  # ``logits`` now holds the logit gradient
        del buf
        ctx.grads = (acc.grad_input, acc.grad_weight, acc.grad_bias, dtarget)
        ctx.stored_scale = grad.stored
        ctx.x_rows = x.shape[0]
        # for a second backward, or one under create_graph=True (references, not copies)
        ctx.save_for_backward(x, linear_weight, linear_bias, target, lse, sums)
        return _outputs(ctx, _reduced(loss, lse, ce, reduction, loss_shape), lse, aux)

    @staticmethod
    def backward(ctx, grad_out, *_aux_grads):
        if ctx.compiled is not None:
            return (*_linear_compile.backward(ctx, grad_out), None, None, None, None, None,
                    None)
        ce, reduction, rows = ctx.options
        need_x, need_w, need_b, need_t = ctx.needs
        if torch.is_grad_enabled() or _autograd.batched(grad_out):
            # create_graph=True (a gradient autograd can differentiate), or a batched
            # upstream gradient (vmap over the backward), which only PyTorch's ops take
            ctx.grads = None
            return (*_differentiable_backward(ctx, grad_out), None, None, None, None, None)
        if reduction == "none" or ctx.grads is None:
            # (for 'mean' / 'sum' a second backward: the first handed its gradients over)
            grads = _backward_recompute(ctx, grad_out)
        else:
            grads, ctx.grads = ctx.grads, None  # give up our references: autograd may steal
            g = grad_out.reshape(())
            if ctx.stored_scale is not None:
                g = g / ctx.stored_scale.reshape(())
            elif g.device.type == "cpu" and bool(g == 1):  # a CPU read is no device sync
                g = None
            if g is not None:
                # probability targets ignore no row
                g, g_rows = (g, g) if ce.soft else _loss.upstream_of_kept_rows(
                    ce.t, ce.options[0], g, ctx.x_rows)
                gx, gw, gb, gt = grads
                grads = (None if gx is None else _scale_(gx, g_rows),
                         *(None if t is None else _scale_(t, g) for t in (gw, gb, gt)))
        w_dtype, b_dtype, t_dtype = ctx.dtypes
        gx, gw, gb, gt = grads
        return (gx if need_x else None, gw.to(w_dtype) if need_w else None,
                gb.to(b_dtype) if need_b else None, gt.to(t_dtype) if need_t else None,
                None, None, None, None, None)


def _outputs(ctx, loss, lse, aux):
    """The loss, and with aux outputs the lse and aux too (not differentiable)."""
    if aux is None:
        return loss
    ctx.mark_non_differentiable(lse, aux)
    return loss, lse, aux


def _differentiable_backward(ctx, grad_out):
    """The gradients under ``create_graph=True``: from ``fusedce._higher`` over the saved
    inputs (they then hold a graph of all the logits, as PyTorch's unfused loss would)."""
    x, linear_weight, linear_bias, target = ctx.saved_tensors[:4]
    ce, reduction, rows = ctx.options
    ignore_index, smoothing = ce.options

    def loss():
        return _higher.linear_cross_entropy(
            x, linear_weight, linear_bias, target, ce.weight, ce.n_classes, ignore_index,
            smoothing, reduction, ce.extras, rows, ctx.loss_shape)[0]

    return _autograd.differentiable_gradients(
        loss, (x, linear_weight, linear_bias, target), ctx.needs, grad_out)


def _backward_recompute(ctx, grad_out):
    """Recompute each chunk's logits, then the CE backward over them: every backward of
    reduction='none', and a second one of 'mean' / 'sum'."""
    x, linear_weight, linear_bias, _, lse, sums = ctx.saved_tensors
    ce, reduction, rows = ctx.options
    need_x, need_w, need_b, need_t = ctx.needs
    acc = GradAccumulator(x, linear_weight, need_x, need_w, need_b)
    dtarget = ce.target_grad_buffer() if need_t else None
    ignore_index, _ = ce.options
    if reduction == "none":
        dloss = grad_out.to(ce.acc).reshape(-1)  # an expanded scalar (stride 0) stays one
    else:
        denom = _loss.denominator(ce.t, ce.weight, ignore_index, ce.n_classes, reduction,
                                  ce.acc)
        dloss = (grad_out.to(ce.acc).reshape(1) / denom).expand(lse.shape[0])
    z_grad = (_loss.z_grad(grad_out, lse, ce.t, ignore_index, reduction, ce.extras)
              if ce.extras.z_loss else None)
    buf = _logits_buffer(x, linear_weight.shape[0], rows)
    for s, e in _chunks(x.shape[0], rows):
        x_c = x[s:e]
        logits = logits_into(buf[:e - s], x_c, linear_weight, linear_bias)
        ce.backward(logits, s, e, lse, sums, dloss, z_grad=z_grad, dtarget=dtarget)
        acc.add(logits, x_c, s, e)
    return acc.grad_input, acc.grad_weight, acc.grad_bias, dtarget


def _autocast_cast(tensor, dtype):
    """``tensor`` as autocast hands it to F.linear: a floating tensor other than float64
    (float32, float16, bfloat16) cast to the autocast dtype; float64 and None left alone
    (ATen's ``cached_cast`` casts only ``is_eligible`` tensors, float64 excluded)."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def _autocast_dtype(device_type):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


@_autograd.no_graph_in_inference_mode
def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=None, label_smoothing=0.0, options=None,
                         backend="auto", chunk_size=None, logit_scale=1.0, softcap=None,
                         lse_square_scale=0.0, return_aux=False):
    """Cross-entropy of ``F.linear(input, linear_weight, linear_bias)`` against ``target``,
    without materialising the (N, C) logits.

    The arguments, their defaults and meaning are those of
    :func:`torch.nn.functional.linear_cross_entropy` (``ignore_index=None`` means -100):
    ``input`` (N, H) or (H,), ``linear_weight`` (C, H) or (C, d1, ..., dK, H) (a
    K-dimensional loss), ``linear_bias`` shaped like ``linear_weight`` without its last
    dimension, ``target`` class indices ((N,), (), or (N, d1, ..., dK)) or class
    probabilities (the logits' shape), class ``weight`` (C,). ``options`` (a
    :class:`torch.nn.LinearCrossEntropyOptions`) is accepted so that calls switch unchanged;
    only its ``batch_chunk_size`` is used (as ``chunk_size``): fusedce always chunks.
    Anything else as ``options`` raises AttributeError, as PyTorch's chunked path does
    (PyTorch ignores it, with a warning, where it would not chunk; fusedce always does).
    Under autocast the float32, float16 and bfloat16 operands are cast to the autocast
    dtype, float64 ones are not, as autocast casts them for F.linear.

    Keyword-only extras:

    backend: ``"auto"`` (Triton CE kernels for CUDA tensors, PyTorch for CPU tensors),
        ``"triton"`` or ``"torch"``, as for :func:`fusedce.cross_entropy`.
    chunk_size: tokens per chunk; by default :func:`chunk_rows` picks it from the shapes.
    logit_scale, softcap, lse_square_scale, return_aux: the loss extras, with the meaning
        they have in :func:`fusedce.cross_entropy`, applied to each chunk's logits in the
        same pass (the aux outputs: ``fusedce.CrossEntropyAux``).

    A ``Shard(0)`` DTensor ``linear_weight`` (a vocabulary-sharded head) runs the
    vocab-parallel loss (``fusedce/_dtensor.py``). Under ``torch.compile`` the loss is the
    opaque ops of ``fusedce/_linear_compile.py`` (no graph break) for class-index targets in
    float32 or bfloat16 without ``return_aux``; other calls break the graph.

    Differences from PyTorch: on a GPU, a target outside ``[0, C)`` that is not
    ``ignore_index`` gives a NaN loss instead of an error (no host synchronisation; on the
    CPU it raises PyTorch's IndexError); a negative
    ``label_smoothing`` raises RuntimeError (as :func:`fusedce.cross_entropy` does; PyTorch
    accepts it).
    """
    fn = "linear_cross_entropy"
    _args.tensors(fn, input=input, linear_weight=linear_weight, target=target,
                  linear_bias=linear_bias, weight=weight)
    reduction, label_smoothing, checked_ignore_index, backend = _args.loss_options(
        fn, reduction, label_smoothing, ignore_index, backend)
    if chunk_size is None:
        chunk_size = _args.linear_options_chunk_size(options)
    chunk_size = _args.chunk_size(chunk_size)
    extras = _args.extras(logit_scale, softcap, lse_square_scale, return_aux)
    if type(linear_weight) is not torch.Tensor and _dtensor.is_dtensor(linear_weight):
        return _dtensor.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=checked_ignore_index,
            label_smoothing=label_smoothing, backend=backend, chunk_size=chunk_size,
            extras=extras)
    # (PyTorch's checks tell ignore_index=None from -100: the argument as given)
    t, loss_shape, soft, ignore_index = _args.linear_inputs(
        input, linear_weight, linear_bias, target, ignore_index)
    n_classes = linear_weight.shape[0]
    # shape, dtype, a gradient only for probabilities (as PyTorch); contiguous
    weight = _args.class_weight(weight, n_classes, fn="fusedce.linear_cross_entropy",
                                soft=soft)
    # (N, H) rows against (C * L, H) outputs: a K-dimensional weight is C * L outputs, the
    # logits' (N, C, L) view is what cross_entropy would see
    # (flatten, not reshape(-1, H): a hidden size of 0 leaves -1 undetermined)
    x = input.unsqueeze(0) if input.dim() == 1 else input.flatten(0, -2)
    w2 = linear_weight.flatten(0, -2)
    b2 = None if linear_bias is None else linear_bias.reshape(-1)
    result_dtype = _args.ce_result_dtype(input, target, weight, soft)
    autocast_dtype = _autocast_dtype(input.device.type)
    if autocast_dtype is not None:
        # what F.linear does under autocast; the loss then comes out in fp32 like
        # F.cross_entropy (computed in fp32 and never rounded to the autocast dtype)
        with torch.autocast(input.device.type, enabled=False):
            x, w2, b2 = (_autocast_cast(v, autocast_dtype) for v in (x, w2, b2))
            out = _fused(x, w2, b2, t, weight, n_classes, ignore_index, label_smoothing,
                         reduction, backend, chunk_size, extras, loss_shape)
    else:
        out = _fused(x, w2, b2, t, weight, n_classes, ignore_index, label_smoothing,
                     reduction, backend, chunk_size, extras, loss_shape)
    loss, lse, aux, ce = out
    loss = loss.to(result_dtype)
    if not extras.aux:
        return loss
    return _loss.aux_outputs(loss, lse, aux, ce.t, ignore_index, reduction, extras,
                             loss_shape, result_dtype)


def _fused(x, linear_weight, linear_bias, t, weight, n_classes, ignore_index,
           label_smoothing, reduction, backend, chunk_size, extras, loss_shape):
    """``(loss, lse, aux, ce)`` of checked arguments: ``x`` (N, H), ``linear_weight``
    (C * L, H), ``t`` as ``_ChunkLoss`` takes it; the loss (reduced, 'none' shaped as
    ``loss_shape``) in the dtype it is computed in."""
    if _linear_compile.serves(x, t, extras):  # torch.compile: opaque ops, no graph break
        opts = _linear_compile.Options(
            n_classes, ignore_index, label_smoothing, reduction, backend, chunk_size,
            extras.logit_scale, extras.softcap, extras.lse_square_scale, tuple(loss_shape))
        inputs = (x, linear_weight, linear_bias)
        if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in inputs):
            loss = LinearCrossEntropyFunction.apply(x, linear_weight, linear_bias, t, weight,
                                                    opts, reduction, None, loss_shape)
        else:
            loss = _linear_compile.loss_only(x, linear_weight, linear_bias, t, weight, opts)
        return loss, None, None, None
    eager = _not_traced() if torch.compiler.is_compiling() else _fused_eager
    return eager(x, linear_weight, linear_bias, t, weight, n_classes, ignore_index,
                 label_smoothing, reduction, backend, chunk_size, extras, loss_shape)


_NOT_TRACED = []


def _not_traced():
    """``_fused_eager`` under ``torch.compiler.disable``: run as it is under
    ``torch.compile`` (a graph break). Traced, the CPU path's worker pool and ``out=``
    writes made Dynamo crash on a later call of another configuration (fp16, then
    ``return_aux``). Made while compiling only: the decorator imports torch._dynamo, which
    imports Triton (before the CLI could switch its interpreter on) and
    torch.distributed.tensor."""
    if not _NOT_TRACED:
        _NOT_TRACED.append(torch.compiler.disable(_fused_eager))
    return _NOT_TRACED[0]


def _fused_eager(x, linear_weight, linear_bias, t, weight, n_classes, ignore_index,
                 label_smoothing, reduction, backend, chunk_size, extras, loss_shape):
    """``_fused`` where no opaque op serves the call."""
    ce = _ChunkLoss(x, t, weight, n_classes, ignore_index, label_smoothing, backend, extras)
    rows = chunk_size
    if rows is None:
        rows = chunk_rows(x.shape[0], x.shape[1], linear_weight.shape[0], x.element_size(),
                          x.device.type)
    differentiable = (x, linear_weight, t) + ((linear_bias,) if linear_bias is not None
                                             else ())
    if _higher.requested(*differentiable) or _args.weight_grad(weight):
        # a forward tangent, a torch.func transform, or class weights to differentiate
        # (probability targets): PyTorch's differentiable ops
        loss, lse, aux = _higher.linear_cross_entropy(
            x, linear_weight, linear_bias, t, weight, n_classes, ignore_index,
            label_smoothing, reduction, extras, rows, loss_shape)
        return loss, lse, aux, ce
    if not ce.soft and t.device.type == "cpu":
        # PyTorch's IndexError, where reading the targets costs no device sync
        _loss.check_targets(t, n_classes, ignore_index)
    if not (torch.is_grad_enabled() and any(v.requires_grad for v in differentiable)):
        # no_grad / eval: the loss only, no gradient work and no autograd state
        aux = _aux_buffer(x, ce)
        loss, lse, _ = _loss_only(x, linear_weight, linear_bias, ce, rows, aux)
        return _reduced(loss, lse, ce, reduction, loss_shape), lse, aux, ce
    out = LinearCrossEntropyFunction.apply(x, linear_weight, linear_bias, t, weight, ce,
                                           reduction,
                                           rows, loss_shape)
    loss, lse, aux = out if extras.aux else (out, None, None)
    return loss, lse, aux, ce


_linear_compile.EAGER_LOSS = _fused  # what its ops run


class LinearCrossEntropyLoss(nn.Module):
    """The loss module of :func:`linear_cross_entropy`; it owns no parameters.

    ``forward(input, linear_weight, target, linear_bias=None)`` takes the head's weight, so a
    head tied to the token embedding (GPT-2) passes ``model.wte.weight``. Unlike
    :class:`torch.nn.LinearCrossEntropyLoss`, which owns its ``Linear``, this module has the
    constructor arguments of the loss only; the class ``weight`` is a buffer as in
    :class:`torch.nn.CrossEntropyLoss`.
    """

    def __init__(self, weight=None, reduction="mean", ignore_index=None, label_smoothing=0.0,
                 *, backend="auto", chunk_size=None, logit_scale=1.0, softcap=None,
                 lse_square_scale=0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.chunk_size = chunk_size
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.lse_square_scale = lse_square_scale

    # as fusedce.CrossEntropyLoss's, called as Python from a script (which knows no default
    # of an ignored method: pass linear_bias, None, there)
    @torch.jit.ignore
    def forward(self, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: Optional[torch.Tensor] = None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    weight=self.weight, reduction=self.reduction,
                                    ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, backend=self.backend,
                                    chunk_size=self.chunk_size, logit_scale=self.logit_scale,
                                    softcap=self.softcap,
                                    lse_square_scale=self.lse_square_scale)
