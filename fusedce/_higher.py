"""The differentiable formulation of fusedce's losses: the same losses written with PyTorch's
own ops, for what the fused route cannot give, higher-order autodiff.

The fused route computes gradients with kernels that autograd cannot differentiate again
and has no forward-mode formula. PyTorch's ops have both, so:

- under a forward tangent (``torch.autograd.forward_ad``) or a ``torch.func`` transform
  (``grad``, ``vmap``, ``jvp``, ``jacfwd``, ``hessian``...), the losses are computed here
  from the start (``requested`` decides, at a cost of well under a microsecond otherwise);
- under ``create_graph=True`` the fused backward recomputes its loss here from the saved
  inputs and differentiates it with ``torch.autograd.grad(..., create_graph=True)``, so the
  gradient it returns is itself differentiable (the first-order path is untouched).

The loss is computed in the dtype the fused route computes it in (float32, or float64 where
an operand is float64), from PyTorch's ``cross_entropy_loss`` (not ``F.cross_entropy``,
which ``fusedce.patched()`` may route back here), plus the loss extras of ``fusedce._args``.
The fused linear loss is taken one chunk of logits at a time, so a forward tangent never
holds the whole logits; a graph for double backward holds them all, as PyTorch's would.
"""

import torch
import torch.autograd.forward_ad as _fwad

from . import _loss, _route


def requested(*tensors):
    """Whether this call needs the differentiable formulation: a ``torch.func`` transform
    is active, or one of ``tensors`` (None allowed) carries a forward-mode tangent."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    if _fwad._current_level < 0:  # no dual level entered: no tangent anywhere
        return False
    return any(t is not None and _fwad.unpack_dual(t).tangent is not None for t in tensors)


def _transformed(x, extras):
    """The logits the loss is of: ``logit_scale``, then ``softcap``."""
    z = x
    if extras.logit_scale != 1.0:
        z = z * extras.logit_scale
    if extras.softcap is not None:
        z = torch.tanh(z / extras.softcap) * extras.softcap
    return z


def _aux(z, lse, t, ignore_index):
    """``(2, rows)``: each row's entropy of softmax(z) and whether its (first) argmax is a
    target not ignored (of probabilities ``t``: the first argmax of ``t``); no gradient."""
    with torch.no_grad():
        p = torch.exp(z - lse.unsqueeze(1))
        pz = torch.where(p > 0, p * z, 0.0).sum(1)
        if t.is_floating_point():
            correct = z.argmax(1) == t.argmax(1)
        else:
            correct = (z.argmax(1) == t) & (t != ignore_index)
        return torch.stack([(lse - pz).reshape(-1), correct.reshape(-1).to(lse.dtype)])


def rows(x, target, weight, ignore_index, label_smoothing, extras):
    """Per-row ``(loss, z_loss, lse, aux)`` of ``x`` (N, C, L) against ``target`` ((N, L)
    indices or (N, C, L) probabilities), each (N, L) except aux ((2, N * L) or None);
    z_loss is None without a z-loss."""
    acc = _loss.acc_dtype(x, target, weight)
    soft = target.is_floating_point()
    z = _transformed(x.to(acc), extras)
    t = target.to(acc) if soft else target.long()
    w = None if weight is None else weight.to(acc)
    loss = _route.pytorch_cross_entropy(z, t, w, None, ignore_index, None, "none",
                                        label_smoothing)
    if not (extras.z_loss or extras.aux):
        return loss, None, None, None
    lse = torch.logsumexp(z, 1)
    z_loss = None
    if extras.z_loss:
        z_loss = extras.lse_square_scale * lse.square()
        if not soft:
            z_loss = torch.where(t != ignore_index, z_loss, 0.0)
    aux = _aux(z, lse, t, ignore_index) if extras.aux else None
    return loss, z_loss, lse, aux


def reduce(loss, z_loss, target, weight, ignore_index, n_classes, reduction):
    """The per-row losses (and z-losses) reduced as the fused route reduces them."""
    denom = _loss.denominator(target, weight, ignore_index, n_classes, reduction, loss.dtype)
    total = _loss.reduce(loss, denom, reduction)
    if z_loss is not None:
        total = total + _loss.reduce(
            z_loss, _loss.z_denominator(target, ignore_index, reduction, loss.dtype),
            reduction)
    return total


def cross_entropy(x, target, weight, ignore_index, label_smoothing, reduction, extras):
    """``(loss, lse, aux)`` of ``x`` (N, C, L): the loss reduced ('none': (N, L)) in the
    dtype it is computed in; ``lse`` (N * L,) and ``aux`` only with ``extras.aux``."""
    if not extras.any:
        acc = _loss.acc_dtype(x, target, weight)
        soft = target.is_floating_point()
        loss = _route.pytorch_cross_entropy(
            x.to(acc), target.to(acc) if soft else target.long(),
            None if weight is None else weight.to(acc), None, ignore_index, None, reduction,
            label_smoothing)
        return loss, None, None
    loss, z_loss, lse, aux = rows(x, target, weight, ignore_index, label_smoothing, extras)
    total = reduce(loss, z_loss, target, weight, ignore_index, x.shape[1], reduction)
    return total, None if lse is None else lse.reshape(-1), aux


def linear_cross_entropy(x, linear_weight, linear_bias, t, weight, n_classes, ignore_index,
                         label_smoothing, reduction, extras, chunk, loss_shape):
    """``(loss, lse, aux)`` of ``x`` (N, H) against ``linear_weight`` (C * L, H), one chunk
    of ``chunk`` rows of logits at a time; ``t`` and the results as in ``cross_entropy``
    ('none' shaped as ``loss_shape``)."""
    losses, z_losses, lses, auxes = [], [], [], []
    positions = t.shape[-1]
    for s in range(0, max(x.shape[0], 1), chunk):
        logits = torch.nn.functional.linear(x[s:s + chunk], linear_weight, linear_bias)
        loss, z_loss, lse, aux = rows(logits.view(-1, n_classes, positions), t[s:s + chunk],
                                      weight, ignore_index, label_smoothing, extras)
        losses.append(loss)
        z_losses.append(z_loss)
        lses.append(lse)
        auxes.append(aux)
    loss = torch.cat(losses)
    z_loss = torch.cat(z_losses) if extras.z_loss else None
    total = reduce(loss, z_loss, t, weight, ignore_index, n_classes, reduction)
    if reduction == "none":
        total = total.view(loss_shape)
    if not extras.aux:
        return total, None, None
    return total, torch.cat(lses).reshape(-1), torch.cat(auxes, 1)
