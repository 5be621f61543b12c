"""cross_entropy over its implementations: the reduction, and the choice between the
row-wise and the strided launchers from the tensors' layout.

Two families of launchers compute per-row losses and the gradient of a weighted sum of them,
each in ``fusedce.kernels`` (Triton) and ``fusedce.cpu`` (PyTorch) under the same names:

- row-wise (``ce_fwd``, ``ce_bwd``, ``ce_scale_``), for class-index targets whose classes are
  contiguous in memory (the language-model case);
- strided (``ce_strided_fwd``, ``ce_strided_bwd``), over the class dimension of (N, C, L)
  logits of any strides: class-probability targets, class-index targets whose classes are
  not contiguous, and float64.

The reduction's denominator stays a device tensor (no host sync). ``forward`` and
``backward`` are what the autograd route (``fusedce._autograd``) runs, directly in eager mode
and inside the ``torch.library`` ops under ``torch.compile``.
"""

import math
from typing import NamedTuple

import torch

from . import _args
from .cpu.strided import acc_dtype as _acc


def acc_dtype(x, target, weight):
    """The dtype the loss is computed in: float64 if any operand is float64, else float32."""
    soft = target.is_floating_point()
    return _acc(x.dtype, target.dtype if soft else x.dtype,
                weight.dtype if weight is not None else x.dtype)


def denominator(target, weight, ignore_index, n_cols, reduction, dtype=torch.float32,
                nan_for_zero=True):
    """The divisor of the summed loss, as a device tensor of shape (1,).

    'mean' divides by the summed class weights of the rows not ignored (PyTorch's weighted
    mean; with no weights, their count). For class-probability targets PyTorch divides by
    the number of rows, weights or not. A divisor of 0 is returned as NaN (``nan_if_zero``)
    unless ``nan_for_zero`` is False (a part of a divisor summed over ranks).
    """
    device = target.device
    finish = nan_if_zero if nan_for_zero else (lambda d: d)
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=device)
    if target.is_floating_point():  # (N, C, L) probabilities: N * L rows
        return finish(torch.full(
            (1,), float(target.numel() // max(n_cols, 1)) if n_cols else 0.0, dtype=dtype,
            device=device))
    # int64: compared with a uint8 target, -100 would wrap to 156 and drop class 156's rows
    target = target.reshape(-1).long()
    kept = target != ignore_index
    if weight is None:
        return finish(kept.sum(dtype=dtype).reshape(1))
    in_range = kept & (target >= 0) & (target < n_cols)
    w_t = weight.to(dtype)[torch.where(in_range, target, 0)]
    return finish(torch.where(in_range, w_t, 0.0).sum().reshape(1))


def nan_if_zero(denom):
    """A mean's divisor, NaN where it is 0 (all rows ignored, or every kept row of class
    weight 0): PyTorch's mean is then NaN whatever the sum (its class term is 0 / 0 even
    where label smoothing makes the sum positive, which over 0 would be +inf), and so is
    the gradient of every row not ignored; ignored rows keep a zero gradient."""
    return denom.masked_fill(denom == 0, float("nan"))


def reduce(loss, denom, reduction):
    """Per-row losses reduced as ``reduction`` says: unchanged for 'none', else their sum,
    divided by ``denom`` (1,) for 'mean' (on the device: no host sync). Every loss uses it."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / denom[0] if reduction == "mean" else total


def rows_view(x):
    """``x`` (N, C, L) as a (N * L, C) view with unit class stride, or None if impossible."""
    if not _has_rows(x):
        return None
    n, n_cols, l_len = x.shape
    if l_len == 1:
        return x.squeeze(2)  # a view whose backward is a view too (select_backward copies)
    if n == 1:
        return x.squeeze(0).t()
    return x.transpose(1, 2).reshape(n * l_len, n_cols)


def _has_rows(x):
    """Whether ``rows_view(x)`` exists, without making it (a view of a tensor that requires
    a gradient is an autograd node: microseconds per call)."""
    n, _, l_len = x.shape
    return x.stride(1) == 1 and (l_len == 1 or n == 1 or x.stride(0) == l_len * x.stride(2))


def from_rows(rows, shape):
    """The inverse of ``rows_view``: ``rows`` (N * L, C) as a view of ``shape`` (N, C, L)."""
    n, n_cols, l_len = shape
    if l_len == 1:
        return rows.unsqueeze(2)
    if n == 1:
        return rows.t().unsqueeze(0)
    return rows.view(n, l_len, n_cols).transpose(1, 2)


def use_rows(x, target, weight):
    """Whether the row-wise implementation serves ``x`` (N, C, L): class indices, classes
    contiguous, rows one stride apart, and no float64 operand (float64 is computed in
    float64 by the strided implementation, as PyTorch would)."""
    return (not target.is_floating_point() and acc_dtype(x, target, weight) == torch.float32
            and _has_rows(x))


def check_targets(target, n_cols, ignore_index):
    """Raise PyTorch's IndexError for a class index outside ``[0, C)`` (host sync)."""
    t = target.reshape(-1).long()  # int64, as in ``denominator``
    bad = (t != ignore_index) & ((t < 0) | (t >= n_cols))
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")


class CrossEntropyAux(NamedTuple):
    """What ``cross_entropy(..., return_aux=True)`` returns. ``loss`` is exactly what the
    call returns without ``return_aux`` (the only entry with a gradient); ``z_loss`` is the
    z-loss term included in it, reduced like it; ``lse`` (``logsumexp(z)``) and ``entropy``
    (of ``softmax(z)``) are per token, shaped like the unreduced loss, every token included;
    ``accuracy`` (0-d) is the fraction of the tokens not ignored whose argmax of ``z`` (the
    first, on a tie) is the target (NaN when all are ignored). ``lse``, ``entropy`` and
    ``accuracy`` are in the dtype the loss is computed in (float32, or float64)."""

    loss: torch.Tensor
    z_loss: torch.Tensor
    lse: torch.Tensor
    accuracy: torch.Tensor
    entropy: torch.Tensor


def aux_outputs(loss, lse, aux, t, ignore_index, reduction, extras, loss_shape, out_dtype):
    """``CrossEntropyAux`` from the loss (reduced, in ``out_dtype``), the per-row lse and
    ``forward``'s aux (2, rows): entropy and correctness (O(rows) work, no host sync)."""
    acc = aux.dtype  # the launchers' lse may be float64 where the loss is not
    lse = lse.to(acc)
    z_loss = reduce(z_loss_rows(lse, t, ignore_index, extras).view(loss_shape),
                    z_denominator(t, ignore_index, reduction, acc), reduction)
    accuracy = aux[1].sum() / z_denominator(t, ignore_index, "mean", acc)[0]
    return CrossEntropyAux(loss, z_loss.to(out_dtype), lse.view(loss_shape), accuracy,
                           aux[0].view(loss_shape))


def one_token(out, reduction, extras):
    """The result of a loss called on one row for a 1-d input: per-token values 0-d (the
    loss itself only for 'none'; every per-token aux value)."""
    if not extras.aux:
        return out.squeeze(0) if reduction == "none" else out
    per_token = ("lse", "entropy") + (("loss", "z_loss") if reduction == "none" else ())
    return out._replace(**{k: getattr(out, k).squeeze(0) for k in per_token})


def extras_implementation(backend, x, target, weight):
    """The launchers for a call with loss extras: ``fusedce.cpu`` wherever the loss is
    computed in float64 (the kernels transform logits in float32), else ``backend``'s."""
    if acc_dtype(x, target, weight) == torch.float64:
        return _args.implementation("torch", x)
    return _args.implementation(backend, x)


def kept_rows(target, ignore_index):
    """The rows (a bool (rows,) tensor) that the z-loss and the accuracy count: those whose
    class index is not ``ignore_index``; every row of (N, C, ...) probability targets."""
    if target.is_floating_point():  # (N, C, L): N * L rows, C = 0 included
        n_rows = target.shape[0] * math.prod(target.shape[2:])
        return torch.ones(n_rows, dtype=torch.bool, device=target.device)
    return target.reshape(-1).long() != ignore_index


def upstream_of_kept_rows(target, ignore_index, g, n_rows):
    """The 0-d upstream gradient ``g`` of a 'mean' / 'sum' linear loss as ``(the factor of
    the weight's and bias's gradients, the input's per row ((n_rows, 1)))``, so that what
    PyTorch never multiplies stays 0 when ``g`` is inf or NaN (a sum over no item, as
    Hugging Face's ``loss / num_items_in_batch`` is when no label counts): a row whose class
    indices are all ignored has a zero input gradient, and with every row ignored so have
    the weight and the bias. ``target``: class indices, ``n_rows`` rows of positions.
    Device ops, no host sync."""
    kept = (kept_rows(target, ignore_index).view(n_rows, -1).any(1) if n_rows else
            torch.zeros(0, dtype=torch.bool, device=g.device))
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where(kept.any(), g, zero), torch.where(kept, g, zero).reshape(n_rows, 1)


def z_loss_rows(lse, target, ignore_index, extras):
    """Each row's z-loss ``lse_square_scale * lse**2``, 0 where the target is ignored, and
    everywhere without a z-loss (where ``lse**2`` overflows too: 0 * inf is NaN)."""
    if not extras.z_loss:
        return torch.zeros_like(lse)
    return torch.where(kept_rows(target, ignore_index), extras.lse_square_scale * lse.square(),
                       0.0)


def z_denominator(target, ignore_index, reduction, dtype):
    """The z-loss's 'mean' divisor: the number of rows not ignored (no class weights);
    for probability targets, of rows."""
    n_cols = target.shape[1] if target.is_floating_point() else 0
    return denominator(target, None, ignore_index, n_cols, reduction, dtype)


def z_grad(grad, lse, target, ignore_index, reduction, extras, denom=None):
    """Each row's z-loss gradient factor ``gz = 2 lse_square_scale lse`` times its upstream
    gradient (over the count of rows not ignored, for 'mean': ``denom`` where given, the
    count over more rows than ``target``'s), 0 where ignored; in ``grad``'s dtype (the
    loss's: the launchers' lse may be float64 where the loss is not)."""
    kept = kept_rows(target, ignore_index)
    acc = grad.dtype
    g = grad.reshape(-1).expand(lse.shape[0])
    if reduction == "mean":
        g = g / (z_denominator(target, ignore_index, reduction, acc) if denom is None
                 else denom)
    return torch.where(kept, g * (2.0 * extras.lse_square_scale) * lse.to(acc), 0.0)


def add_z_loss(loss, lse, target, ignore_index, reduction, extras, shape):
    """``loss`` (already reduced) plus the z-loss reduced the same way (rows as ``shape``
    for 'none')."""
    zl = z_loss_rows(lse.to(loss.dtype), target, ignore_index, extras).view(shape)
    return loss + reduce(zl, z_denominator(target, ignore_index, reduction, loss.dtype),
                         reduction)


def forward(x, target, weight, ignore_index, label_smoothing, reduction, backend, validate,
            extras=_args.NO_EXTRAS, with_z_loss=True):
    """Reduced loss of ``x`` (N, C, L) against ``target`` ((N, L) indices or (N, C, L)
    probabilities). Returns ``(loss, lse, s, denom, aux)``: loss (N, L) for 'none' else a
    scalar, in the accumulation dtype; lse (float64, each row's offset and log-sum apart,
    rounded once) and s (O(rows) state for the backward); denom
    (1,); aux (2, N * L) each row's entropy and correctness where ``extras.aux`` (else
    empty). With loss ``extras`` the loss is of the transformed logits, z-loss included
    unless ``with_z_loss`` is False (a caller that adds it once over more rows)."""
    n, n_cols, l_len = x.shape
    soft = target.is_floating_point()
    acc = acc_dtype(x, target, weight)
    if validate and not soft:
        check_targets(target, n_cols, ignore_index)
    aux = x.new_empty((2, n * l_len) if extras.aux else (0,), dtype=acc)
    options = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if extras.any:
        options.update(extras=extras, aux_out=aux if extras.aux else None)
    if n_cols == 0:
        # no class, no launcher (a max over no class): the lse -inf, no entropy, nothing
        # correct. Probabilities: each row's loss an empty sum, 0 (PyTorch's). Indices: 0
        # where ignored, else NaN (out of range); with label smoothing NaN everywhere, as
        # PyTorch's eps / C times an empty sum, 0 / 0
        if soft:
            loss = x.new_zeros(n * l_len, dtype=acc)
        else:
            kept = kept_rows(target, ignore_index)
            loss = torch.where(kept | (label_smoothing > 0), float("nan"), 0.0).to(acc)
        lse = x.new_full((n * l_len,), float("-inf"), dtype=torch.float64)
        s = x.new_zeros(n * l_len, dtype=acc)
        if extras.aux:
            aux[0].fill_(float("nan"))
            aux[1].zero_()
    elif use_rows(x, target, weight):
        impl = _args.implementation(backend, x)
        loss, lse = impl.ce_fwd(rows_view(x), target.reshape(-1).contiguous(), **options)
        s = x.new_empty(0, dtype=acc)
    else:
        impl = (extras_implementation(backend, x, target, weight) if extras.any
                else _args.implementation(backend, x))
        loss, lse, s = impl.ce_strided_fwd(x, target, **options)
    denom = denominator(target, weight, ignore_index, n_cols, reduction, dtype=acc)
    loss = reduce(loss.view(n, l_len), denom, reduction)
    if extras.z_loss and with_z_loss:
        loss = add_z_loss(loss, lse, target, ignore_index, reduction, extras, (n, l_len))
    return loss, lse, s, denom, aux


def backward(grad, x, target, weight, lse, s, denom, ignore_index, label_smoothing, reduction,
             backend, need_dx, need_dtarget, extras=_args.NO_EXTRAS, out=None, z_denom=None):
    """Gradients ``(dx, dtarget)`` of the loss from ``forward``, given its upstream gradient
    ``grad`` ((N, L) for 'none', else a scalar). ``dx`` is laid out like ``torch.empty_like(x)``,
    or written into ``out`` (which may be ``x``); an entry not asked for is an empty tensor.
    ``denom`` (and ``z_denom``, the z-loss's, where given) may count more rows than ``x``
    has: the fused linear loss takes the gradient of one chunk of a mean at a time."""
    n, n_cols, l_len = x.shape
    acc = acc_dtype(x, target, weight)
    if reduction == "none":
        dloss = grad.to(acc)
    else:
        # one scalar for all rows, broadcast with stride 0 (no (N, L) tensor is made)
        dloss = grad.to(acc).reshape(1)
        if reduction == "mean":
            dloss = dloss / denom
        dloss = dloss.reshape(1, 1).expand(n, l_len)
    dx = (torch.empty_like(x) if out is None else out) if need_dx else x.new_empty(0)
    dy = target.new_empty(0)
    need_dtarget = need_dtarget and target.is_floating_point()
    if not (need_dx or need_dtarget):
        return dx, dy
    if n_cols == 0:  # no class: both gradients are empty
        return dx, (torch.empty_like(target) if need_dtarget else dy)
    options = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if extras.any:
        zg = (z_grad(grad, lse, target, ignore_index, reduction, extras, z_denom)
              if extras.z_loss else None)
        options.update(extras=extras, z_grad=zg)
    dx_rows = rows_view(dx) if need_dx and use_rows(x, target, weight) else None
    if dx_rows is not None:
        impl = _args.implementation(backend, x)
        impl.ce_bwd(rows_view(x), target.reshape(-1).contiguous(), lse, dloss.reshape(-1),
                    dx=dx_rows, **options)
        return dx, dy
    impl = (extras_implementation(backend, x, target, weight) if extras.any
            else _args.implementation(backend, x))
    dx_out, dy_out = impl.ce_strided_bwd(
        x, target, lse, s, dloss, dx=dx if need_dx else None, need_dx=need_dx,
        need_dtarget=need_dtarget, **options)
    if dy_out is not None:
        dy = dy_out
    return dx, dy
