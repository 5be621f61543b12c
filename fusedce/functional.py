"""The public functional API: ``fusedce.cross_entropy``, a drop-in for
``torch.nn.functional.cross_entropy``."""

import torch

from ._function import CrossEntropyFunction, resolve_backend

_REDUCTIONS = ("none", "mean", "sum")


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                  reduce=None, reduction="mean", label_smoothing=0.0, *, backend="auto",
                  inplace_backward=False):
    """Cross-entropy between logits ``input`` and class indices ``target``.

    The arguments, their order, defaults and meaning are those of
    :func:`torch.nn.functional.cross_entropy`. Keyword-only extras:

    backend: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch for CPU tensors),
        ``"triton"`` (the kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``) or
        ``"torch"``.
    inplace_backward: compute the gradient during the forward and write it over ``input``.
        This **destroys the logits**: use it only when nothing else reads them after the
        loss (the usual language-model head). Saves a logits-sized allocation and a pass.
    """
    if size_average is not None or reduce is not None:
        raise NotImplementedError("fusedce.cross_entropy: the legacy size_average/reduce "
                                  "arguments are not supported yet; use reduction=")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if target.is_floating_point():
        raise NotImplementedError("fusedce.cross_entropy: class-probability (float) targets "
                                  "are not supported yet")
    if input.dim() == 1:
        loss = cross_entropy(input.unsqueeze(0), target.unsqueeze(0), weight,
                             ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing, backend=backend,
                             inplace_backward=inplace_backward)
        return loss.squeeze(0) if reduction == "none" else loss
    if input.dim() != 2:
        raise NotImplementedError("fusedce.cross_entropy: inputs of shape (N, C, d1, ...) "
                                  "are not supported yet")
    if target.shape != input.shape[:1]:
        raise ValueError(f"Expected target of shape ({input.shape[0]},) for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    n_classes = input.shape[1]
    if weight is not None and (weight.dim() != 1 or weight.numel() != n_classes):
        raise RuntimeError(f"weight tensor should be defined either for all {n_classes} "
                           f"classes or no classes but got weight tensor of shape: "
                           f"{list(weight.shape)}")
    impl = resolve_backend(backend, input)
    if input.stride(1) != 1:
        input = input.contiguous()  # the kernels need unit stride along the classes
    return CrossEntropyFunction.apply(input, target, weight, int(ignore_index),
                                      float(label_smoothing), reduction, impl,
                                      bool(inplace_backward))
