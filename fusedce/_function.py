"""The autograd Function over (rows, C) logits, and the choice of implementation.

Both implementations (the Triton launchers in ``fusedce.kernels`` and the PyTorch one in
``fusedce._torch_impl``) compute per-row losses and the gradient of a weighted sum of them;
this layer adds the reduction, whose denominator stays a device tensor (no host sync).
"""

import torch

from . import _torch_impl

BACKENDS = ("auto", "triton", "torch")


def _kernels():
    # Imported on first use so that ``import fusedce`` needs neither Triton nor a GPU.
    from . import kernels

    return kernels


def resolve_backend(backend, x):
    """The implementation module for ``backend`` and the device of ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    return _kernels() if backend == "triton" else _torch_impl


def denominator(target, weight, ignore_index, n_cols, reduction):
    """The divisor of the summed loss, as an fp32 device tensor of shape (1,).

    'mean' divides by the summed class weights of the rows not ignored (PyTorch's weighted
    mean; with no weights, their count), so all rows ignored gives 0 / 0 = NaN as in PyTorch.
    """
    if reduction != "mean":
        return torch.ones(1, dtype=torch.float32, device=target.device)
    kept = target != ignore_index
    if weight is None:
        return kept.sum(dtype=torch.float32).reshape(1)
    in_range = kept & (target >= 0) & (target < n_cols)
    w_t = weight.float()[torch.where(in_range, target, 0).long()]
    return torch.where(in_range, w_t, 0.0).sum().reshape(1)


class CrossEntropyFunction(torch.autograd.Function):
    """Reduced cross-entropy of ``x`` (rows, C) against class indices ``target`` (rows,).

    Saves only O(rows) state (the log-sum-exp) besides the inputs. With ``inplace_backward``
    the gradient is computed during the forward and written over ``x``; the backward then
    only rescales rows whose upstream gradient differs from 1.
    """

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, label_smoothing, reduction, impl,
                inplace_backward):
        denom = denominator(target, weight, ignore_index, x.shape[1], reduction)
        inplace_scale = None
        if inplace_backward and ctx.needs_input_grad[0]:
            inplace_scale = 1.0 / denom
        loss, lse = impl.ce_fwd(x, target, weight=weight, ignore_index=ignore_index,
                                label_smoothing=label_smoothing, inplace_scale=inplace_scale)
        ctx.impl = impl
        ctx.options = (ignore_index, label_smoothing, reduction, inplace_scale is not None)
        ctx.save_for_backward(x, target, weight, lse, denom)
        if reduction == "none":
            return loss.to(x.dtype)
        total = loss.sum()
        if reduction == "mean":
            total = total / denom[0]
        return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, target, weight, lse, denom = ctx.saved_tensors
        ignore_index, label_smoothing, reduction, inplace = ctx.options
        n_rows = x.shape[0]
        if reduction == "none":
            dloss = grad_out.float()  # may be an expanded scalar: its stride 0 is honoured
        else:
            dloss = grad_out.float().reshape(1).expand(n_rows)
        if inplace:
            # the forward already divided by the denominator
            return (ctx.impl.ce_scale_(x, dloss),) + (None,) * 7
        if reduction == "mean":
            dloss = (grad_out.float().reshape(1) / denom).expand(n_rows)
        dx = ctx.impl.ce_bwd(x, target, lse, dloss, weight=weight, ignore_index=ignore_index,
                             label_smoothing=label_smoothing)
        return (dx,) + (None,) * 7
