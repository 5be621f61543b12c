"""The public functional API: ``fusedce.cross_entropy``, a drop-in for
``torch.nn.functional.cross_entropy``.

This layer checks the arguments (raising what PyTorch raises), brings every input form to
logits of shape (N, C, L) with the class dimension at 1 (a view, no copy, except for
``(N, C, d1, ..., dK)`` inputs whose trailing dimensions cannot be merged by a view), and calls
the ``torch.library`` op ``fusedce::cross_entropy`` (``_ops.py``) under ``torch.compile``,
which keeps it whole; in eager mode, an autograd Function running the same forward and
backward without the op's dispatch cost.
"""

import operator
import warnings

import torch

from . import _ops  # registers torch.ops.fusedce.*
from ._function import (
    BACKENDS,
    CrossEntropyFunction,
    _torch_impl,
    check_targets,
    no_graph_in_inference_mode,
    resolve_backend,
    rows_view,
    use_rows,
)

_REDUCTIONS = ("none", "mean", "sum")
_LOW_PRECISION = (torch.float16, torch.bfloat16)  # what autocast computes the loss in fp32 for
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _legacy_reduction(size_average, reduce):
    """torch.nn._reduction.legacy_get_string (same result, same warning), written out so
    that torch.compile traces it without a graph break."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = ("mean" if size_average else "sum") if reduce else "none"
    if not torch.compiler.is_compiling():  # warnings.warn would break the graph
        warnings.warn(f"size_average and reduce args will be deprecated, please use "
                      f"reduction='{reduction}' instead.", stacklevel=3)
    return reduction


def _check_reduction(reduction):
    """torch.nn._reduction.get_enum's checks: ValueError for an unknown name, a warning for
    the deprecated 'elementwise_mean'."""
    if reduction == "elementwise_mean":
        if not torch.compiler.is_compiling():
            warnings.warn("reduction='elementwise_mean' is deprecated. Please use "
                          "reduction='mean' instead.", stacklevel=3)
        return "mean"
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _is_autocast(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return device_type == "cuda" and torch.is_autocast_enabled()


def _result_dtype(input, target, weight, soft):
    """The dtype of PyTorch's result: under autocast the loss is a float32 op (fp16/bf16
    operands promoted), else the input's dtype (promoted with the probabilities' and the
    weight's for probability targets)."""
    autocast = _is_autocast(input.device.type)

    def effective(dtype):
        return torch.float32 if autocast and dtype in _LOW_PRECISION else dtype

    dtype = effective(input.dtype)
    if soft:
        dtype = torch.promote_types(dtype, effective(target.dtype))
        if weight is not None:
            dtype = torch.promote_types(dtype, effective(weight.dtype))
    return dtype


def _check_args(input, target, weight, ignore_index, backend):
    for name, value in (("input", input), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cross_entropy(): argument '{name}' must be Tensor, "
                            f"not {type(value).__name__}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"cross_entropy(): argument 'weight' must be Tensor, "
                        f"not {type(weight).__name__}")
    try:  # PyTorch takes any integer, e.g. numpy.int64 or a 0-d integer tensor, not bool
        if isinstance(ignore_index, bool):
            raise TypeError
        index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"cross_entropy(): argument 'ignore_index' must be int, "
                        f"not {type(ignore_index).__name__}") from None
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not input.is_floating_point():
        raise NotImplementedError(f"cross_entropy: input must be a floating-point tensor of "
                                  f"logits, got dtype {input.dtype}")
    for name, value in (("target", target), ("weight", weight)):
        if value is not None and value.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found "
                               f"input on {input.device} and {name} on {value.device}")
    return index


def _as_ncl(input, target, soft):
    """``(x, t, loss_shape)``: logits as (N, C, L), targets as (N, L) or (N, C, L), and the
    shape of the unreduced loss. Raises PyTorch's errors for mismatched shapes."""
    if soft:
        if input.dim() == 1:
            return input.view(1, -1, 1), target.view(1, -1, 1), ()
        return _ncl(input), _ncl(target), (input.shape[0],) + input.shape[2:]
    if target.dtype not in _INDEX_DTYPES:
        raise RuntimeError(f"expected target dtype to be Long or Byte (class indices; fusedce "
                           f"also takes int32), but got {target.dtype}; class-probability "
                           f"targets must have the input's shape {tuple(input.shape)}")
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: "
                             f"{target.shape[0]}")
        return input.view(1, -1, 1), target.view(1, 1), ()
    batch = target.shape[0] if target.dim() > 0 else 0
    if batch != input.shape[0] or target.dim() == 0:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target "
                         f"batch_size ({batch}).")
    if input.dim() == 2 and target.dim() != 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    expected = (input.shape[0],) + input.shape[2:]
    if target.shape != expected:
        raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
    return _ncl(input), target.flatten(1) if target.dim() > 1 else target.unsqueeze(-1), expected


def _ncl(x):
    """(N, C, d1, ..., dK) as (N, C, L): a view unless d1..dK cannot be merged by one."""
    return x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)


def _check_weight(weight, n_classes, fn="fusedce.cross_entropy"):
    if weight.dim() != 1 or weight.numel() != n_classes:
        raise RuntimeError(f"weight tensor should be defined either for all {n_classes} "
                           f"classes or no classes but got weight tensor of shape: "
                           f"{list(weight.shape)}")
    if not weight.is_floating_point():
        raise RuntimeError(f"expected a floating-point weight, but found {weight.dtype}")
    # PyTorch also insists on the input's dtype for class-index targets; fusedce reads any
    # floating weight in the computation's precision, so a float32 weight with bf16 logits
    # is accepted.
    if weight.requires_grad:
        raise RuntimeError(f"{fn} is not differentiable with respect to 'weight'; pass "
                           f"weight.detach()")


def _validates_by_default(input, backend):
    """``validate=None``: CPU tensors on the PyTorch path only. Elsewhere the check is a
    host sync (a CUDA tensor with backend='torch' too), and Triton on CPU tensors stands in
    for the GPU path."""
    return input.device.type == "cpu" and resolve_backend(backend, input) is _torch_impl


def _saved_tensor_hooks_active():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _rows_disjoint(rows):
    """Whether the rows of ``rows`` (R, C), classes contiguous, occupy disjoint memory: an
    in-place gradient written over overlapping rows (e.g. expanded logits) would corrupt
    the rows still to be read."""
    return rows.shape[0] <= 1 or rows.stride(0) >= rows.shape[1]


@no_graph_in_inference_mode
def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                  reduce=None, reduction="mean", label_smoothing=0.0, *, backend="auto",
                  inplace_backward=False, validate=None):
    """Cross-entropy between logits ``input`` and class indices or class probabilities
    ``target``.

    The arguments, their order, defaults and meaning are those of
    :func:`torch.nn.functional.cross_entropy`: ``input`` (C,), (N, C) or (N, C, d1, ..., dK);
    ``target`` class indices of shape (), (N,) or (N, d1, ..., dK) (int64 or uint8 as in
    PyTorch, and int32), or class probabilities of the input's shape; ``weight`` (C,); the
    legacy ``size_average``/``reduce``. Keyword-only extras:

    backend: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch for CPU tensors),
        ``"triton"`` (the kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``) or
        ``"torch"``.
    inplace_backward: compute the gradient during the forward and write it over ``input``.
        This **destroys the logits**: use it only when nothing else reads them after the
        loss (the usual language-model head). Saves a logits-sized allocation (and, on
        a GPU, a pass over the logits).
        It applies to class-index targets with the classes contiguous in memory and rows
        disjoint in memory, in eager mode, to float32 and bfloat16 logits that require a
        gradient with grad mode on; elsewhere (under ``torch.compile`` or ``no_grad``, and
        for float16 logits) it is accepted and has no effect. Not
        float16: the gradient would be stored in fp16 before a loss scale (GradScaler's
        65,536) multiplies it, and its small entries would underflow to zero.
        On the CPU the default mode computes the gradient in the forward too, into a
        separate buffer (the logits stay intact) that fusedce reuses once nothing refers to
        it any more (``fusedce.empty_cache()`` frees it); the graph holds that gradient
        from the forward to the backward, where PyTorch's holds its log-softmax.
    validate: raise PyTorch's ``IndexError`` for a class index outside ``[0, C)``. ``None``
        (default) checks CPU tensors on the PyTorch path only: the check reads the targets
        on the host, a synchronisation the GPU path avoids (also with ``backend="torch"``);
        there such a row's loss and gradient are NaN instead.
    """
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    reduction = _check_reduction(reduction)
    ignore_index = _check_args(input, target, weight, ignore_index, backend)
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: "
                           f"{label_smoothing}")
    soft = input.shape == target.shape  # PyTorch's rule for class-probability targets
    if soft and not target.is_floating_point():
        raise RuntimeError(f"Expected floating point type for target with class "
                           f"probabilities, got {target.dtype}")
    if soft and ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if input.dim() == 0:
        raise IndexError("cross_entropy: input must have 1 or more dimensions (C,), (N, C) "
                         "or (N, C, d1, ..., dK); got a 0-dimensional tensor")
    x, t, loss_shape = _as_ncl(input, target, soft)
    out_dtype = _result_dtype(input, target, weight, soft)
    if weight is not None:
        _check_weight(weight, x.shape[1])
        weight = weight.contiguous()
    validate = _validates_by_default(input, backend) if validate is None else bool(validate)
    # the gradient in the forward only when one will be taken: under no_grad the logits
    # stay intact and nothing but the loss is computed
    grad_in_forward = (torch.is_grad_enabled() and input.requires_grad
                       and not torch.compiler.is_compiling() and use_rows(x, t, weight)
                       and x.dtype != torch.float16)
    inplace = inplace_backward and grad_in_forward and _rows_disjoint(rows_view(x))
    impl = resolve_backend(backend, input) if grad_in_forward else None
    # the CPU default mode keeps its gradient on the autograd context, out of reach of
    # saved-tensor hooks: under them (non-reentrant checkpointing, offloading) the loss
    # saves only what the backward-time path saves, through the hooks
    if inplace or (grad_in_forward and impl is _torch_impl and input.device.type == "cpu"
                   and not _saved_tensor_hooks_active()):
        if validate:
            check_targets(t, x.shape[1], ignore_index)
        loss = CrossEntropyFunction.apply(rows_view(x), t.reshape(-1).contiguous(), weight,
                                          ignore_index, label_smoothing, reduction, impl,
                                          inplace)
    elif torch.compiler.is_compiling():
        loss = torch.ops.fusedce.cross_entropy(x, t, weight, ignore_index, label_smoothing,
                                               reduction, backend, validate)[0]
    else:
        loss = _ops.EagerCrossEntropy.apply(x, t, weight, ignore_index, label_smoothing,
                                            reduction, backend, validate)
    if reduction == "none":
        loss = loss.reshape(loss_shape)
    return loss.to(out_dtype)
