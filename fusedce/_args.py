"""The front door: every loss's arguments are checked here, once, and the implementation is
picked here, per call, from the tensors.

``cross_entropy``, ``linear_cross_entropy``, the vocab-parallel losses and the loss modules
all come through these functions, so that one argument means one thing and fails one way
everywhere, with the exception type PyTorch raises for it (``torch/nn/functional.py``,
``torch/nn/_reduction.py``). Nothing here computes a loss.
"""

import math
import numbers
import operator
import os
import warnings
from typing import NamedTuple, Optional

import torch

REDUCTIONS = ("none", "mean", "sum")
BACKENDS = ("auto", "triton", "torch")
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)  # PyTorch's Long and Byte, and int32
_LOW_PRECISION = (torch.float16, torch.bfloat16)  # what autocast computes the loss in fp32 for


# ------------------------------------------------------------------------------------------
# Options shared by every loss


def reduction(value, size_average=None, reduce=None):
    """The reduction's name: PyTorch's ``legacy_get_string`` for the legacy ``size_average``
    / ``reduce`` (same result, same warning), then ``get_enum``'s checks: ValueError for an
    unknown name, a warning for the deprecated 'elementwise_mean'. Written out so that
    torch.compile traces it without a graph break (a warning would break the graph)."""
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        value = ("mean" if size_average else "sum") if reduce else "none"
        if not torch.compiler.is_compiling():
            warnings.warn(f"size_average and reduce args will be deprecated, please use "
                          f"reduction='{value}' instead.", stacklevel=4)
    if value == "elementwise_mean":
        if not torch.compiler.is_compiling():
            warnings.warn("reduction='elementwise_mean' is deprecated. Please use "
                          "reduction='mean' instead.", stacklevel=4)
        return "mean"
    if not isinstance(value, str) or value not in REDUCTIONS:
        raise ValueError(f"{value} is not a valid value for reduction")
    return value


def label_smoothing(value, fn="cross_entropy"):
    """``label_smoothing`` as a float in [0, 1]: what PyTorch's argument parser takes for a
    float (a real number, bool, a 0-d tensor), TypeError for anything else (a str, None);
    RuntimeError outside [0, 1], as F.cross_entropy, and for NaN and a negative value, which
    F.cross_entropy ignores and F.linear_cross_entropy applies."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}(): argument 'label_smoothing' must be float, "
                        f"not {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {value}")
    return value


def ignore_index(value, fn="cross_entropy", default=None):
    """``ignore_index`` as an int: any integer (numpy.int64, a 0-d integer tensor), not
    bool, TypeError otherwise; None gives ``default`` where there is one (-100 for
    F.linear_cross_entropy's None; F.cross_entropy refuses None)."""
    if value is None and default is not None:
        return default
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}(): argument 'ignore_index' must be int, "
                        f"not {type(value).__name__}") from None
    if not -2 ** 63 <= value < 2 ** 63:  # PyTorch's int64 argument
        raise ValueError("Overflow when unpacking long long")
    return value


def backend(value):
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
    return value


def run_options(backend_=None, inplace_backward=False, validate=None):
    """Checks the options of a call that are not the loss's own: ``backend`` (ValueError),
    ``inplace_backward`` a bool and ``validate`` None or a bool (TypeError: a string such as
    "no" would be truthy)."""
    if backend_ is not None:
        backend(backend_)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got "
                        f"{type(inplace_backward).__name__}")
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate must be None or a bool, got {type(validate).__name__}")


def tensors(fn, **named):
    """TypeError, as PyTorch's argument parser, for an argument that is not a Tensor
    (None passes: the caller says which may be absent)."""
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{fn}(): argument '{name}' must be Tensor, "
                            f"not {type(value).__name__}")


def same_device(input, **named):
    for name, value in named.items():
        if value is not None and value.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found "
                               f"input on {input.device} and {name} on {value.device}")


def class_weight(weight, n_classes, fn="fusedce.cross_entropy", soft_dtype=None, soft=False):
    """Checks a class-weight vector of ``n_classes`` entries (None: any length, for the
    vocab-parallel losses whose class count is known only after their collective);
    returns it contiguous (the implementations read ``weight[t]`` at unit stride). With
    class-probability targets (``soft``; ``soft_dtype``: the logits' and targets' promoted
    dtype) an integer or bool weight is taken in that dtype, as PyTorch's type promotion
    does.

    A weight that requires a gradient, as PyTorch has it: an error for class indices with
    grad mode on (its ``nll_loss`` is not differentiable in the weight), accepted under
    ``no_grad``, and for class probabilities differentiated (``weight_grad``)."""
    if weight is None:
        return None
    if weight.dim() != 1 or (n_classes is not None and weight.numel() != n_classes):
        count = "all classes" if n_classes is None else f"all {n_classes} classes"
        raise RuntimeError(f"weight tensor should be defined either for {count} or no "
                           f"classes but got weight tensor of shape: {list(weight.shape)}")
    if not weight.is_floating_point() and soft_dtype is not None:
        weight = weight.to(soft_dtype)
    if not weight.is_floating_point():
        raise RuntimeError(f"expected a floating-point weight, but found {weight.dtype}")
    # PyTorch also insists on the input's dtype for class-index targets; fusedce reads any
    # floating weight in the computation's precision, so a float32 weight with bf16 logits
    # is accepted.
    if weight.requires_grad and not (soft or soft_dtype is not None) and torch.is_grad_enabled():
        raise RuntimeError(f"{fn} is not differentiable with respect to 'weight' with "
                           f"class-index targets (neither is PyTorch's); pass weight.detach()")
    return weight.contiguous()


def weight_grad(weight):
    """Whether a checked class weight (of class-probability targets: ``class_weight``
    refuses the others) needs its gradient: then only PyTorch's differentiable ops serve
    the call (fusedce's fused passes differentiate the logits alone)."""
    return weight is not None and weight.requires_grad and torch.is_grad_enabled()


class Extras(NamedTuple):
    """The loss extras (``fusedce.cross_entropy``'s keyword-only ``logit_scale``,
    ``softcap``, ``lse_square_scale``, ``return_aux``), checked. With ``x`` a row's logits:
    ``z = softcap * tanh(logit_scale * x / softcap)`` (``logit_scale * x`` without a
    softcap) is what the loss is the cross-entropy of; ``lse_square_scale *
    logsumexp(z)**2`` is added for every token not ignored; ``aux`` asks for the per-token
    log-sum-exp and entropy and the accuracy beside the loss."""

    logit_scale: float = 1.0
    softcap: Optional[float] = None
    lse_square_scale: float = 0.0
    aux: bool = False

    @property
    def transform(self):
        """Whether the logits are transformed (z != x)."""
        return self.logit_scale != 1.0 or self.softcap is not None

    @property
    def z_loss(self):
        return self.lse_square_scale != 0.0

    @property
    def any(self):
        return self.transform or self.z_loss or self.aux

    def kwargs(self):
        """The keyword arguments of a loss that give these extras (to call one again)."""
        return dict(logit_scale=self.logit_scale, softcap=self.softcap,
                    lse_square_scale=self.lse_square_scale, return_aux=self.aux)


NO_EXTRAS = Extras()


def _finite_float(name, value):
    """A real number (int, float, numpy scalar; not bool, str or Tensor) as a finite float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:  # not math.isfinite: torch.compile(dynamic=True)
        # traces this and cannot put the bool math.isfinite returns in its graph
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def extras(logit_scale=1.0, softcap=None, lse_square_scale=0.0, return_aux=False):
    """The loss extras as an ``Extras``: finite real numbers (a Tensor is refused: reading
    it would be a host synchronisation), ``softcap`` None or > 0, ``return_aux`` a bool;
    TypeError for a wrong type, ValueError for a wrong value."""
    scale = _finite_float("logit_scale", logit_scale)
    if softcap is not None:
        softcap = _finite_float("softcap", softcap)
        if softcap <= 0.0:
            raise ValueError(f"softcap must be None or a positive float, got {softcap}")
    square = _finite_float("lse_square_scale", lse_square_scale)
    if square < 0:  # a penalty: a negative one rewards large logits without bound
        raise ValueError(f"lse_square_scale must be >= 0, got {lse_square_scale}")
    if not isinstance(return_aux, bool):
        raise TypeError(f"return_aux must be a bool, got {type(return_aux).__name__}")
    checked = Extras(scale, softcap, square, return_aux)
    return checked if checked.any else NO_EXTRAS


def loss_options(fn, reduction_, label_smoothing_, ignore_index_, backend_):
    """The four options every loss takes, checked: ``(reduction, label_smoothing,
    ignore_index, backend)``."""
    return (reduction(reduction_), label_smoothing(label_smoothing_, fn),
            ignore_index(ignore_index_, fn, -100 if fn == "linear_cross_entropy" else None),
            backend(backend_))


# ------------------------------------------------------------------------------------------
# The choice of implementation


_IMPLS = {}


def _kernels():
    # imported on first use, so that ``import fusedce`` needs neither Triton nor a GPU
    from . import kernels

    return kernels


def _launchers(name):
    impl = _IMPLS.get(name)
    if impl is None:
        if name == "triton":
            impl = _kernels()
        else:
            from . import cpu as impl
        _IMPLS[name] = impl
    return impl


def implementation(backend_, x):
    """The launchers for ``backend_`` and the device of ``x``: the ``fusedce.kernels`` module
    (Triton) or the ``fusedce.cpu`` module (PyTorch); both have the same launchers with the
    same signatures. ``"auto"``: Triton for CUDA tensors, PyTorch elsewhere."""
    if backend_ == "auto":
        backend_ = "triton" if x.is_cuda else "torch"
    elif backend_ == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # else Triton's own "0 active drivers ([]). There should only be one."
        raise RuntimeError(f"backend='triton' on {x.device.type} tensors runs the kernels "
                           f"under Triton's interpreter: set TRITON_INTERPRET=1 before triton "
                           f"is imported, or use backend='auto' (PyTorch's CPU path)")
    return _launchers(backend_)


def is_cpu_impl(impl):
    """Whether ``impl`` is the PyTorch implementation (by identity, not by module name: a
    copy of the package imported under another name, as ``bench.revisions`` does, took the
    other route and ran 3x slower)."""
    return impl is _launchers("torch")


# ------------------------------------------------------------------------------------------
# cross_entropy's shapes and dtypes


def ce_inputs(input, target, ignore_index_):
    """``(x, t, loss_shape, soft)`` for ``F.cross_entropy``'s ``input``/``target``: logits as
    (N, C, L) (a view, unless the trailing dimensions of (N, C, d1, ..., dK) cannot be merged
    by one), targets as (N, L) indices or (N, C, L) probabilities, the shape of the
    unreduced loss, and whether the targets are probabilities. Raises PyTorch's errors."""
    soft = input.shape == target.shape  # PyTorch's rule for class-probability targets
    if soft and not target.is_floating_point():
        raise RuntimeError(f"Expected floating point type for target with class "
                           f"probabilities, got {target.dtype}")
    if not input.is_floating_point():
        raise NotImplementedError(f"cross_entropy: input must be a floating-point tensor of "
                                  f"logits, got dtype {input.dtype}")
    if soft and ignore_index_ >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if input.dim() == 0:
        raise IndexError("cross_entropy: input must have 1 or more dimensions (C,), (N, C) "
                         "or (N, C, d1, ..., dK); got a 0-dimensional tensor")
    if soft:
        if input.dim() == 1:
            return input.view(1, -1, 1), target.view(1, -1, 1), (), True
        return _ncl(input), _ncl(target), (input.shape[0],) + input.shape[2:], True
    if input.dim() > 1:  # PyTorch checks the batch size before the target's dtype
        batch = target.shape[0] if target.dim() > 0 else 0
        if batch != input.shape[0] or target.dim() == 0:
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target "
                             f"batch_size ({batch}).")
    if target.dtype not in INDEX_DTYPES:
        raise RuntimeError(f"expected target dtype to be Long or Byte (class indices; fusedce "
                           f"also takes int32), but got {target.dtype}; class-probability "
                           f"targets must have the input's shape {tuple(input.shape)}")
    if input.dim() == 3 and input.shape[1] == 0:
        # PyTorch's (N, 0, d) loss raises "size mismatch" (its (N, 0, d1, d2) one does not)
        raise RuntimeError(f"size mismatch: (N, C, d) input of no class, "
                           f"{tuple(input.shape)}, against targets {tuple(target.shape)}")
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: "
                             f"{target.shape[0]}")
        return input.view(1, -1, 1), target.view(1, 1), (), False
    if input.dim() == 2 and target.dim() != 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    expected = (input.shape[0],) + input.shape[2:]
    if target.shape != expected:
        raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
    t = target.flatten(1) if target.dim() > 1 else target.unsqueeze(-1)
    return _ncl(input), t, expected, False


def _ncl(x):
    """(N, C, d1, ..., dK) as (N, C, L): a view unless d1..dK cannot be merged by one."""
    return x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)


def autocast_enabled(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return device_type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know ("meta"): never enabled
        return False


def ce_result_dtype(input, target, weight, soft):
    """The dtype of PyTorch's result: under autocast the loss is a float32 op (fp16/bf16
    operands promoted), else the input's dtype (promoted with the probabilities' and the
    weight's for probability targets)."""
    autocast = autocast_enabled(input.device.type)

    def effective(dtype):
        return torch.float32 if autocast and dtype in _LOW_PRECISION else dtype

    dtype = effective(input.dtype)
    if soft:
        dtype = torch.promote_types(dtype, effective(target.dtype))
        if weight is not None:
            dtype = torch.promote_types(dtype, effective(weight.dtype))
    return dtype


# ------------------------------------------------------------------------------------------
# linear_cross_entropy's and the vocab-parallel losses' shapes


def linear_inputs(input, linear_weight, linear_bias, target, ignore_index_):
    """F.linear_cross_entropy's checks, in its order and with its messages, then
    ``cross_entropy``'s on the logits it would make. ``ignore_index_`` is as given (None:
    PyTorch's -100, and the only value probability targets take).

    Returns ``(t, loss_shape, soft, ignore_index)``: the targets as (N, L) class indices or
    (N, C, L) probabilities (``ce_inputs`` on the logits PyTorch would make, (N, C, d1, ...,
    dK) or (C,) for a 1-d input), the shape of the unreduced loss, whether the targets are
    probabilities, and the checked ``ignore_index``.
    """
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError("expected linear_weight with dimensionality at least 2, got "
                           f"{linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError("expected equal input and linear_weight last dimensions "
                           f"(in_features), got {input.shape[-1]} and "
                           f"{linear_weight.shape[-1]}, respectively")
    out_shape = tuple(linear_weight.shape[:-1])  # (C, d1, ..., dK)
    if linear_bias is not None and tuple(linear_bias.shape) != out_shape:
        raise RuntimeError(f"expected linear_bias shape {out_shape}, got "
                           f"{tuple(linear_bias.shape)}")
    if len(out_shape) > 1 and input.dim() == 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
            f"requires batched input, (N, {input.shape[-1]}), got unbatched input with shape "
            f"{tuple(input.shape)}")
    logits_shape = (*input.shape[:-1], *out_shape)
    if tuple(target.shape) == logits_shape and ignore_index_ is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains "
                           "probabilities")
    ignore_index_ = ignore_index(ignore_index_, "linear_cross_entropy", -100)
    # cross_entropy's checks of the target against the logits, on a tensor without data
    logits = torch.empty((), dtype=input.dtype, device="meta").expand(logits_shape)
    _, t, loss_shape, soft = ce_inputs(logits, target, ignore_index_)
    if not soft and target.dtype not in (torch.int64, torch.uint8):
        # (int32 only: ``ce_inputs`` refused the others) PyTorch's name for it
        raise RuntimeError("expected target dtype to be Long or Byte, but got Int")
    return t, loss_shape, soft, ignore_index_


def chunk_size(value, name="chunk_size"):
    """Rows per chunk of the fused linear losses: None (chosen from the shapes) or a
    positive integer (an int, a numpy integer; not bool): TypeError for another type (a
    float is not truncated, a str not parsed), ValueError for one below 1."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        rows = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int or None, got "
                        f"{type(value).__name__} {value!r}") from None
    if rows <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return rows


def linear_options_chunk_size(options):
    """The ``batch_chunk_size`` of F.linear_cross_entropy's ``options`` (None for None), the
    one field fusedce uses. ``options`` must be a ``torch.nn.LinearCrossEntropyOptions``:
    anything else (a dict) raises AttributeError, the error PyTorch's chunked path raises
    (it reads the options' attributes), instead of being ignored."""
    if options is None:
        return None
    cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if cls is not None and not isinstance(options, cls):
        raise AttributeError(f"linear_cross_entropy: options must be a "
                             f"torch.nn.LinearCrossEntropyOptions or None, got "
                             f"{type(options).__name__}")
    return chunk_size(options.batch_chunk_size, "options.batch_chunk_size")


def vocab_parallel_target(target, n_rows):
    """Class indices in the global vocabulary, one per row of this rank's logits."""
    if target.is_floating_point():
        raise NotImplementedError("class-probability (float) targets are not supported")
    if target.shape != (n_rows,):
        raise ValueError(f"Expected target of shape ({n_rows},), got {tuple(target.shape)}")


def vocab_parallel_logits(logits_shard):
    if logits_shard.dim() not in (1, 2):
        raise NotImplementedError("logits_shard must be (N, C_r) or (C_r,); flatten the "
                                  "batch and sequence dimensions first")


def vocab_parallel_linear(input, linear_weight):
    if input.dim() != 2 or linear_weight.dim() != 2 or input.shape[1] != linear_weight.shape[1]:
        raise RuntimeError(f"expected input (N, H) and linear_weight (C_r, H), got "
                           f"{tuple(input.shape)} and {tuple(linear_weight.shape)}")
