"""The plain math of fusedce's loss and its gradient, in float64: the spec the tests hold both
implementations to, beside ``torch.nn.functional.cross_entropy``. Nothing here is fast.

For logits ``x`` (N, C), class indices ``t``, class weights ``w`` (all ones when absent),
``W = sum_c w_c`` and label smoothing ``eps``, per row::

    lse  = log sum_c exp(x_c)                  p_c = exp(x_c - lse)
    loss = (1 - eps) w_t (lse - x_t) + eps / C sum_c w_c (lse - x_c)
    dloss / dx_c = A p_c - B [c == t] - eps / C w_c,   B = (1 - eps) w_t,  A = B + eps W / C

A row whose target is ``ignore_index`` has loss 0 and gradient 0. ``'mean'`` divides the sum
by the summed ``w_t`` of the rows not ignored (PyTorch's weighted mean). With class
probabilities ``y`` (N, C) instead of indices: ``loss = sum_c w_c y'_c (lse - x_c)``,
``y' = (1 - eps) y + eps / C``, and ``'mean'`` divides by N.
"""

import torch


def _rows(x, target, weight, ignore_index, label_smoothing):
    """Per-row losses, the coefficients of their gradient, and the mean's denominator."""
    x = x.double()
    n, c = x.shape
    eps = label_smoothing
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    lse = torch.logsumexp(x, 1, keepdim=True)
    if target.is_floating_point():  # class probabilities
        y = w * ((1 - eps) * target.double() + eps / c)
        return (y * (lse - x)).sum(1), y.sum(1, keepdim=True), y, float(n)
    kept = target.long() != ignore_index  # a uint8 target would compare -100 as 156
    t = torch.where(kept, target.long(), 0)
    w_t = w[t] * kept
    loss = (1 - eps) * w_t * (lse - x).gather(1, t[:, None]).squeeze(1)
    loss = loss + kept * eps / c * (w * (lse - x)).sum(1)
    # the gradient of a row is A p - Y: Y = B onehot(t) + eps / C w, A = sum_c Y_c
    y = (1 - eps) * w_t[:, None] * torch.nn.functional.one_hot(t, c) + kept[:, None] * eps / c * w
    return loss, y.sum(1, keepdim=True), y, w_t.sum()


def cross_entropy(x, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                  reduction="mean"):
    """The loss of logits ``x`` (N, C) against class indices (N,) or probabilities (N, C)."""
    loss, _, _, denom = _rows(x, target, weight, ignore_index, label_smoothing)
    if reduction == "none":
        return loss
    return loss.sum() / denom if reduction == "mean" else loss.sum()


def cross_entropy_grad(x, target, grad, weight=None, ignore_index=-100, label_smoothing=0.0,
                       reduction="mean"):
    """The gradient with respect to ``x`` of ``cross_entropy(...)``, given the upstream
    gradient ``grad`` of the result (its shape)."""
    _, a, y, denom = _rows(x, target, weight, ignore_index, label_smoothing)
    g = grad.double().reshape(-1, 1) if reduction == "none" else grad.double().reshape(1, 1)
    if reduction == "mean":
        g = g / denom
    p = torch.softmax(x.double(), 1)
    return g * (a * p - y)
