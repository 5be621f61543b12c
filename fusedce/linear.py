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

import torch
from torch import nn

from . import _args, _autograd, _loss

# Chunk size heuristic (rows per chunk), see ``chunk_rows``.
MIN_CHUNK_ROWS = 128  # fewer rows make the three matrix products inefficient
# Most bytes of logits per chunk. The CPU pays per operation (the PyTorch CE is a dozen
# ops per chunk) and per pass over the (V, H) weight gradient (one per chunk), so it wants
# few, large chunks (128 MiB: 512 GPT-2 rows; docs/benchmarks.md has the sweep). A GPU runs
# a 256-row product at full speed and keeps its memory for the model.
MAX_CHUNK_BYTES = {"cpu": 1 << 27, "cuda": 1 << 26}  # 128 MiB, 64 MiB
SHARE = 8  # a chunk holds at most 1/SHARE of the tokens (above MIN_CHUNK_ROWS)


def chunk_rows(n_rows, in_features, n_classes, itemsize, device_type="cpu"):
    """Rows per chunk for ``n_rows`` tokens, ``in_features`` hidden size, ``n_classes`` vocab.

    A power of two, at most ``n_rows / SHARE`` (so the chunk's logits are at most 1/SHARE of
    the full logits) but at least ``MIN_CHUNK_ROWS``, with at most ``MAX_CHUNK_BYTES`` of
    logits, and never more rows than tokens. ``in_features`` does not enter (the products'
    efficiency depends on the rows), it is kept for callers that tune on it.
    """
    del in_features
    if n_rows <= 0:
        return 1
    cap = MAX_CHUNK_BYTES.get(device_type, MAX_CHUNK_BYTES["cuda"])
    rows = max(MIN_CHUNK_ROWS, n_rows // SHARE)
    rows = min(rows, max(1, cap // max(1, n_classes * itemsize)))
    rows = 1 << (rows.bit_length() - 1)  # round down to a power of two
    return max(1, min(rows, n_rows))


# --- chunk building blocks (also the pieces a vocab-parallel loss reuses) -------------------


def logits_into(out, x_c, linear_weight, linear_bias=None):
    """``out = x_c @ linear_weight.T (+ linear_bias)``; ``out`` is a (rows, V) buffer view."""
    if linear_bias is None:
        return torch.mm(x_c, linear_weight.t(), out=out)
    return torch.addmm(linear_bias, x_c, linear_weight.t(), out=out)


class GradAccumulator:
    """Turns each chunk's logit gradient into the input, weight and bias gradients.

    ``grad_input`` (N, H) in the input's dtype is written chunk by chunk; ``grad_weight``
    (V, H) and ``grad_bias`` (V,) are fp32 sums over the chunks. On the GPU a low-precision
    chunk product goes through one (V, H) scratch in the input dtype (cuBLAS accumulates
    within the chunk in fp32); on the CPU the chunk is upcast and multiplied in fp32, as
    fast as a bf16 product plus an fp32 add (docs/benchmarks.md) and without the (V, H)
    scratch.
    """

    def __init__(self, x, linear_weight, need_input, need_weight, need_bias, upcast=None):
        """``upcast``: the CPU's fp32 product (default on CPU tensors) or the GPU's scratch."""
        n_classes, in_features = linear_weight.shape
        self.linear_weight = linear_weight
        self.grad_input = torch.empty_like(x, memory_format=torch.contiguous_format) \
            if need_input else None
        self.grad_weight = torch.zeros(n_classes, in_features, dtype=torch.float32,
                                       device=x.device) if need_weight else None
        self.grad_bias = torch.zeros(n_classes, dtype=torch.float32, device=x.device) \
            if need_bias else None
        self._scratch = None
        self._low_precision = x.dtype != torch.float32
        self._upcast = x.device.type == "cpu" if upcast is None else upcast

    def add(self, dlogits, x_c, start, end):
        if self.grad_input is not None:
            torch.mm(dlogits, self.linear_weight, out=self.grad_input[start:end])
        if self.grad_weight is not None:
            if not self._low_precision:
                self.grad_weight.addmm_(dlogits.t(), x_c)
            elif self._upcast:
                self.grad_weight.addmm_(dlogits.t().float(), x_c.float())
            else:
                if self._scratch is None:
                    self._scratch = torch.empty_like(self.linear_weight,
                                                     memory_format=torch.contiguous_format)
                torch.mm(dlogits.t(), x_c, out=self._scratch)
                self.grad_weight.add_(self._scratch)
        if self.grad_bias is not None:
            self.grad_bias.add_(dlogits.sum(0, dtype=torch.float32))


def _chunks(n_rows, rows):
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def _logits_buffer(x, n_classes, rows):
    return torch.empty(min(rows, x.shape[0]), n_classes, dtype=x.dtype, device=x.device)


def _aux_buffer(x, extras):
    """The (2, N) entropy and correctness of ``extras.aux``, else None."""
    return x.new_empty((2, x.shape[0]), dtype=torch.float32) if extras.aux else None


def _loss_only(x, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
               impl, rows, extras=_args.NO_EXTRAS, aux=None):
    """Per-row losses and log-sum-exps (fp32), one chunk of logits at a time; with
    ``extras``, of the transformed logits, and each row's aux into ``aux`` (2, N)."""
    n_rows = x.shape[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    buf = _logits_buffer(x, linear_weight.shape[0], rows)
    for s, e in _chunks(n_rows, rows):
        logits = logits_into(buf[:e - s], x[s:e], linear_weight, linear_bias)
        loss[s:e], lse[s:e] = impl.ce_fwd(logits, target[s:e], weight=weight,
                                          ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, extras=extras,
                                          aux_out=None if aux is None else aux[:, s:e])
    return loss, lse


def _reduced(loss, lse, target, weight, ignore_index, reduction, n_classes, extras):
    """The per-row losses reduced, the z-loss of ``extras`` added (reduced the same way)."""
    denom = _loss.denominator(target, weight, ignore_index, n_classes, reduction)
    total = _loss.reduce(loss, denom, reduction)
    if extras.z_loss:
        total = _loss.add_z_loss(total, lse, target, ignore_index, reduction, extras,
                                 loss.shape)
    return total


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of ``x @ W.T (+ b)`` (x: (N, H), W: (V, H)) against ``target`` (N,).

    'mean' / 'sum': the forward computes the gradients (scaled by 1 / denominator) and keeps
    them; the backward multiplies them in place by the upstream scalar, so a second backward
    through the same graph is an error (as with PyTorch's chunked path). 'none': the forward
    keeps the log-sum-exps; the backward recomputes the logits chunk by chunk.

    With the loss ``extras`` (``fusedce._args.Extras``) each chunk's CE is of the
    transformed logits, the z-loss is added, and with ``extras.aux`` the outputs are
    ``(loss, lse, aux)``, the last two not differentiable (as ``CrossEntropyFunction``'s).
    """

    @staticmethod
    def forward(ctx, x, linear_weight, linear_bias, target, weight, ignore_index,
                label_smoothing, reduction, impl, rows, extras):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and linear_bias is not None
        n_classes = linear_weight.shape[0]
        ctx.options = (ignore_index, label_smoothing, reduction, impl, rows, extras)
        ctx.needs = (need_x, need_w, need_b)
        ctx.dtypes = (x.dtype, linear_weight.dtype,
                      None if linear_bias is None else linear_bias.dtype)
        aux = _aux_buffer(x, extras)
        if reduction == "none":
            loss, lse = _loss_only(x, linear_weight, linear_bias, target, weight, ignore_index,
                                   label_smoothing, impl, rows, extras, aux)
            ctx.save_for_backward(x, linear_weight, linear_bias, target, weight, lse)
            loss = _reduced(loss, lse, target, weight, ignore_index, reduction, n_classes,
                            extras)
            return _outputs(ctx, loss, lse, aux)
        # 'mean' / 'sum': gradients of loss.sum() / denom (and of the z-loss), computed now
        denom = _loss.denominator(target, weight, ignore_index, n_classes, reduction)
        scale = 1.0 / denom
        z_scale = None
        if extras.z_loss:
            z_scale = (2.0 * extras.lse_square_scale) / _loss.z_denominator(
                target, ignore_index, reduction, torch.float32)
        acc = GradAccumulator(x, linear_weight, need_x, need_w, need_b)
        n_rows = x.shape[0]
        loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        buf = _logits_buffer(x, n_classes, rows)
        for s, e in _chunks(n_rows, rows):
            x_c = x[s:e]
            logits = logits_into(buf[:e - s], x_c, linear_weight, linear_bias)
            loss[s:e], lse[s:e] = impl.ce_fwd(
                logits, target[s:e], weight=weight, ignore_index=ignore_index,
                label_smoothing=label_smoothing, grad_scale=scale, extras=extras,
                aux_out=None if aux is None else aux[:, s:e], z_scale=z_scale)
            acc.add(logits, x_c, s, e)  # ``logits`` now holds the logit gradient
        del buf
        ctx.grads = (acc.grad_input, acc.grad_weight, acc.grad_bias)
        loss = _reduced(loss, lse, target, weight, ignore_index, reduction, n_classes, extras)
        return _outputs(ctx, loss, lse, aux)

    @staticmethod
    def backward(ctx, grad_out, *_aux_grads):
        ignore_index, label_smoothing, reduction, impl, rows, extras = ctx.options
        need_x, need_w, need_b = ctx.needs
        if reduction == "none":
            grads = _backward_none(ctx, grad_out)
        else:
            if getattr(ctx, "grads", None) is None:
                raise RuntimeError(
                    "fusedce.linear_cross_entropy: the gradients of a 'mean'/'sum' loss are "
                    "computed in the forward and consumed by the first backward; a second "
                    "backward through the same graph (retain_graph=True) is not supported")
            grads, ctx.grads = ctx.grads, None  # give up our references: autograd may steal
            g = grad_out.reshape(())
            skip = g.device.type == "cpu" and bool(g == 1)  # a CPU read is no device sync
            if not skip:
                grads = tuple(t.mul_(g.to(t.dtype)) if t is not None else None
                              for t in grads)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gx, gw, gb = grads
        gx = gx if need_x else None
        gw = gw.to(w_dtype) if need_w else None
        gb = gb.to(b_dtype) if need_b else None
        return gx, gw, gb, None, None, None, None, None, None, None, None


def _outputs(ctx, loss, lse, aux):
    """The loss, and with aux outputs the lse and aux too (not differentiable)."""
    if aux is None:
        return loss
    ctx.mark_non_differentiable(lse, aux)
    return loss, lse, aux


def _backward_none(ctx, grad_out):
    """reduction='none': recompute each chunk's logits, then the CE backward over them."""
    x, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors
    ignore_index, label_smoothing, _, impl, rows, extras = ctx.options
    need_x, need_w, need_b = ctx.needs
    acc = GradAccumulator(x, linear_weight, need_x, need_w, need_b)
    dloss = grad_out.float()  # may be an expanded scalar (stride 0): slicing keeps that
    z_grad = (_loss.z_grad(grad_out, lse, target, ignore_index, "none", extras)
              if extras.z_loss else None)
    buf = _logits_buffer(x, linear_weight.shape[0], rows)
    for s, e in _chunks(x.shape[0], rows):
        x_c = x[s:e]
        logits = logits_into(buf[:e - s], x_c, linear_weight, linear_bias)
        impl.ce_bwd(logits, target[s:e], lse[s:e], dloss[s:e], weight=weight,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, dx=logits,
                    extras=extras, z_grad=None if z_grad is None else z_grad[s:e])
        acc.add(logits, x_c, s, e)
    return acc.grad_input, acc.grad_weight, acc.grad_bias


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
    ``input`` (N, H) or (H,), ``linear_weight`` (C, H), ``linear_bias`` (C,), ``target``
    (N,) or () class indices (int64 or uint8), class ``weight`` (C,). ``options`` (a
    :class:`torch.nn.LinearCrossEntropyOptions`) is accepted so that calls switch unchanged;
    only its ``batch_chunk_size`` is used (as ``chunk_size``): fusedce always chunks.

    Keyword-only extras:

    backend: ``"auto"`` (Triton CE kernels for CUDA tensors, PyTorch for CPU tensors),
        ``"triton"`` or ``"torch"``, as for :func:`fusedce.cross_entropy`.
    chunk_size: tokens per chunk; by default :func:`chunk_rows` picks it from the shapes.
    logit_scale, softcap, lse_square_scale, return_aux: the loss extras, with the meaning
        they have in :func:`fusedce.cross_entropy`, applied to each chunk's logits in the
        same pass (the aux outputs: ``fusedce.CrossEntropyAux``).

    Differences from PyTorch: class-probability targets and K-dimensional ``linear_weight``
    are not supported (NotImplementedError); a target outside ``[0, C)`` that is not
    ``ignore_index`` gives a NaN loss instead of an error (no host synchronisation); for
    'mean'/'sum' the gradients are computed in the forward, so a second backward through the
    same graph raises RuntimeError; a negative ``label_smoothing`` raises RuntimeError (as
    :func:`fusedce.cross_entropy` does; PyTorch accepts it).
    """
    fn = "linear_cross_entropy"
    _args.tensors(fn, input=input, linear_weight=linear_weight, target=target,
                  linear_bias=linear_bias, weight=weight)
    reduction, label_smoothing, ignore_index, backend = _args.loss_options(
        fn, reduction, label_smoothing, ignore_index, backend)
    n_classes = _args.linear_inputs(input, linear_weight, linear_bias, target)
    # shape, dtype, and no gradient (PyTorch raises for one); contiguous
    weight = _args.class_weight(weight, n_classes, fn="fusedce.linear_cross_entropy")
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    chunk_size = _args.chunk_size(chunk_size)
    extras = _args.extras(logit_scale, softcap, lse_square_scale, return_aux)
    if input.dim() == 1:
        out = linear_cross_entropy(input.unsqueeze(0), linear_weight, target.unsqueeze(0),
                                   linear_bias=linear_bias, weight=weight, reduction=reduction,
                                   ignore_index=ignore_index, label_smoothing=label_smoothing,
                                   options=options, backend=backend, chunk_size=chunk_size,
                                   **extras.kwargs())
        return _loss.one_token(out, reduction, extras)

    # the CE kernels read target[row] at unit stride; an O(rows) copy
    target = target.contiguous()
    autocast_dtype = _autocast_dtype(input.device.type)
    if autocast_dtype is None:
        return _fused(input, linear_weight, linear_bias, target, weight, ignore_index,
                      label_smoothing, reduction, backend, chunk_size, extras, input.dtype)
    # what F.linear does under autocast; the loss then comes out in fp32 like F.cross_entropy
    # (computed in fp32 and never rounded to the autocast dtype on the way)
    with torch.autocast(input.device.type, enabled=False):
        return _fused(input.to(autocast_dtype), linear_weight.to(autocast_dtype),
                      None if linear_bias is None else linear_bias.to(autocast_dtype), target,
                      weight, ignore_index, label_smoothing, reduction, backend, chunk_size,
                      extras, torch.float32)


def _fused(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
           reduction, backend, chunk_size, extras, result_dtype):
    """``linear_cross_entropy`` of checked 2-d arguments, the loss in ``result_dtype`` (the
    loss and z-loss are computed in fp32 and rounded to it once)."""
    n_classes = linear_weight.shape[0]
    impl = (_loss.extras_implementation(backend, input, weight) if extras.any
            else _args.implementation(backend, input))
    n_rows = input.shape[0]
    rows = chunk_size
    if rows is None:
        rows = chunk_rows(n_rows, input.shape[1], n_classes, input.element_size(),
                          input.device.type)
    differentiable = (input, linear_weight) + ((linear_bias,) if linear_bias is not None else ())
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)):
        # no_grad / eval: the loss only, no gradient work and no autograd state
        aux = _aux_buffer(input, extras)
        loss, lse = _loss_only(input, linear_weight, linear_bias, target, weight, ignore_index,
                               label_smoothing, impl, rows, extras, aux)
        loss = _reduced(loss, lse, target, weight, ignore_index, reduction, n_classes, extras)
    else:
        out = LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target,
                                               weight, ignore_index, label_smoothing,
                                               reduction, impl, rows, extras)
        loss, lse, aux = out if extras.aux else (out, None, None)
    loss = loss.to(result_dtype)
    if not extras.aux:
        return loss
    return _loss.aux_outputs(loss, lse, aux, target, ignore_index, reduction, extras,
                             (n_rows,), result_dtype)


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

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    weight=self.weight, reduction=self.reduction,
                                    ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, backend=self.backend,
                                    chunk_size=self.chunk_size, logit_scale=self.logit_scale,
                                    softcap=self.softcap,
                                    lse_square_scale=self.lse_square_scale)
