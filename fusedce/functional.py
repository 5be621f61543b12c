"""The public functional API: ``fusedce.cross_entropy``, a drop-in for
``torch.nn.functional.cross_entropy``.

The front door (``fusedce._args``) checks the arguments, raising what PyTorch raises, and brings
every input form to logits of shape (N, C, L) with the class dimension at 1 (a view, no copy,
except for ``(N, C, d1, ..., dK)`` inputs whose trailing dimensions cannot be merged by a
view); this module decides where the gradient is computed and calls the one autograd route,
``fusedce._autograd.CrossEntropyFunction``.
"""

import inspect
import types

import torch

from . import _args, _autograd, _dtensor, _higher, _loss, _route
from ._loss import CrossEntropyAux  # noqa: F401  (fusedce.CrossEntropyAux)

_pytorch_loss = torch._C._nn.cross_entropy_loss
_INT64 = torch.int64
_ENUMS = _route.REDUCTION_ENUMS
_TENSOR = torch.Tensor
# the defaults of ``ignore_index`` and ``label_smoothing`` (PyTorch's), tested by identity
_IGNORE_INDEX, _SMOOTHING = -100, 0.0
# fusedce's keyword-only options of ``cross_entropy`` and their defaults. The function takes
# them as ``**options`` (its ``__signature__`` shows them as keyword-only parameters): Python
# fills every keyword-only parameter left out from a dict lookup on each call, about 70 ns
# for these seven, a quarter of what a small call handed to PyTorch may add to it
# (docs/benchmarks.md, "The hand-off's cost per call").
OPTIONS = types.MappingProxyType({
    "backend": "auto", "inplace_backward": False, "validate": None, "logit_scale": 1.0,
    "softcap": None, "lse_square_scale": 0.0, "return_aux": False})


def _validates_by_default(input, impl):
    """``validate=None``: CPU tensors on the PyTorch path only. Elsewhere the check is a
    host sync (a CUDA tensor with backend='torch' too), and Triton on CPU tensors stands in
    for the GPU path."""
    return input.device.type == "cpu" and _args.is_cpu_impl(impl)


def _saved_tensor_hooks_active():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _rows_disjoint(rows):
    """Whether the rows of ``rows`` (R, C), classes contiguous, occupy disjoint memory: an
    in-place gradient written over overlapping rows (e.g. expanded logits) would corrupt
    the rows still to be read."""
    return rows.shape[0] <= 1 or rows.stride(0) >= rows.shape[1]


def _grad_mode(x, t, weight, impl, inplace_backward):
    """Where the gradient is computed (``_autograd.Options.mode``). In the forward only when
    one will be taken (under no_grad the logits stay intact and only the loss is computed),
    in eager mode, by the row-wise launchers, and not for float16 (the gradient would be
    stored in fp16 before a loss scale multiplies it). In place where asked for and the
    rows are disjoint; into a reused buffer by default on the CPU path, except under
    saved-tensor hooks (checkpointing, offloading): the buffer is kept on the autograd
    context, out of their reach, so there the backward-time path saves through them."""
    if not (torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()
            and _loss.use_rows(x, t, weight) and x.dtype != torch.float16 and x.shape[1] > 0):
        return "backward"
    if inplace_backward and _rows_disjoint(_loss.rows_view(x)):
        return "inplace"
    if (_args.is_cpu_impl(impl) and x.device.type == "cpu"
            and not _saved_tensor_hooks_active()):
        return "forward"
    return "backward"


def _options(options):
    """``cross_entropy``'s keyword-only options, the defaults filled in; Python's TypeError
    for a keyword it does not take."""
    if not options:
        return OPTIONS
    for name in options:
        if name not in OPTIONS:
            raise TypeError(f"cross_entropy() got an unexpected keyword argument '{name}'")
    opts = {**OPTIONS, **options}
    _args.run_options(opts["backend"], opts["inplace_backward"], opts["validate"])
    return opts


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=_IGNORE_INDEX,
                  reduce=None, reduction="mean", label_smoothing=_SMOOTHING, **options):
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
        from the forward to the backward, where PyTorch's holds its log-softmax. Both modes
        read the logits once and write one logits-sized gradient, and on the CPU they take
        about the same time (in place / default 0.90-1.00 in float32, 0.97-1.05 in
        bfloat16, 512 to 4,096 x 50,257: docs/benchmarks.md). In place cannot gain more: the
        default mode's one extra fetch, of its buffer's lines, is hidden under the exp,
        and in float32 in place takes each row's exact max, a pass the default mode skips
        (its shift from the first columns needs the logits until a chunk's sums are
        tested, and keeping them in a scratch chunk costs more than that pass). So the
        flag keeps its own path, as fast, for what it saves: the reused buffer.
    validate: raise PyTorch's ``IndexError`` for a class index outside ``[0, C)``. ``None``
        (default) checks CPU tensors on the PyTorch path only: the check reads the targets
        on the host, a synchronisation the GPU path avoids (also with ``backend="torch"``);
        there such a row's loss and gradient are NaN instead.

    The losses of current LLMs (``x`` a token's logits, ``t`` its target), computed in the
    same pass over the logits, for class indices and class probabilities alike:

    logit_scale: ``z = logit_scale * x`` (muP, Gemma).
    softcap: when a float ``s > 0``, ``z = s * tanh(z / s)`` after ``logit_scale``
        (Gemma-2's final logit softcapping, 30.0). The loss is the cross-entropy of ``z``
        with every option above, and its gradient flows through both, exactly.
    lse_square_scale: adds the z-loss ``lse_square_scale * logsumexp(z)**2`` of every token
        not ignored (PaLM), reduced like the loss: 'sum' adds them, 'none' gives it per
        token (0 where ignored), 'mean' divides their sum by the number of tokens not
        ignored (class weights do not enter it).
    return_aux: return a ``CrossEntropyAux`` ``(loss, z_loss, lse, accuracy, entropy)``
        instead of the loss alone. With class probabilities no token is ignored, and a
        token is accurate where the first argmax of ``z`` is the first of its target's.

    With ``backend="auto"``, CPU calls too small for fusedce's path to be faster (under 8M
    to 32M logits by mode and dtype, see ``fusedce/_route.py``) are served by PyTorch's own
    loss, with the same results; ``inplace_backward`` then leaves the logits intact.

    PyTorch's loss saves its log-softmax, so its caller may change the logits in place
    before the backward. fusedce's CPU path allows it too (the gradient is made in the
    forward); where the backward re-reads the logits (the kernels, ``torch.compile``,
    saved-tensor hooks, float16) such a change raises autograd's "modified by an inplace
    operation" error instead of giving a wrong gradient.
    """
    # The hand-off to PyTorch's loss (fusedce/_route.py). It runs before every call, so the
    # usual small call (a plain tensor, int64 targets, no weight, no legacy arguments, no
    # option) is decided inline from the fewest reads; an argument of an odd type raises in
    # there and the call goes on to the general test, then PyTorch's loss or fusedce's
    # front door raise for it.
    if not options and (type(input) is _TENSOR or not _dtensor.is_dtensor(input)):
        try:
            # (a symbolic size, under torch.compile or export, is left to the general test)
            if (input.is_cpu and type(n := input.numel()) is int and n < _route.SMALLEST
                    and weight is None
                    and target.dtype is _INT64 and size_average is None and reduce is None):
                if ignore_index is _IGNORE_INDEX and label_smoothing is _SMOOTHING:
                    # both left out (these very objects: no other value or type can pass
                    # for them), so left to PyTorch's defaults: its parser takes 0.2-0.4 us
                    # to read these two arguments
                    return _pytorch_loss(input, target, None, _ENUMS[reduction])
                if label_smoothing >= 0.0:
                    return _pytorch_loss(input, target, None, _ENUMS[reduction],
                                         ignore_index, label_smoothing)
        except (AttributeError, TypeError, KeyError):
            pass
    opts = _options(options)
    backend, validate = opts["backend"], opts["validate"]
    scale, softcap, square, aux = (opts["logit_scale"], opts["softcap"],
                                   opts["lse_square_scale"], opts["return_aux"])
    if type(input) is not _TENSOR and _dtensor.is_dtensor(input):
        return _dtensor.cross_entropy(
            cross_entropy, input, target, weight, ignore_index,
            _args.reduction(reduction, size_average, reduce), label_smoothing, backend,
            _args.extras(scale, softcap, square, aux), validate)
    if (backend == "auto" and validate is not False and softcap is None and aux is False
            and _route.plain_scales(scale, square)
            and _route.pytorch_serves(input, target, weight, label_smoothing)):
        return _pytorch_loss(input, target, weight,
                             _route.reduction_enum(reduction, size_average, reduce),
                             ignore_index, label_smoothing)
    return _cross_entropy(input, target, weight, size_average, ignore_index, reduce,
                          reduction, label_smoothing, backend, opts["inplace_backward"],
                          validate, _args.extras(scale, softcap, square, aux))


cross_entropy.__signature__ = inspect.Signature(
    [p for p in inspect.signature(cross_entropy).parameters.values()
     if p.kind is not p.VAR_KEYWORD]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
       for name, default in OPTIONS.items()])


@_autograd.no_graph_in_inference_mode
def _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                   label_smoothing, backend, inplace_backward, validate,
                   extras=_args.NO_EXTRAS):
    """fusedce's own path of ``cross_entropy``."""
    _args.tensors("cross_entropy", input=input, target=target, weight=weight)
    reduction = _args.reduction(reduction, size_average, reduce)
    ignore_index = _args.ignore_index(ignore_index)
    backend = _args.backend(backend)
    label_smoothing = _args.label_smoothing(label_smoothing)
    _args.same_device(input, target=target, weight=weight)
    x, t, loss_shape, soft = _args.ce_inputs(input, target, ignore_index)
    out_dtype = _args.ce_result_dtype(input, target, weight, soft)
    weight = _args.class_weight(weight, x.shape[1], soft_dtype=torch.promote_types(
        input.dtype, target.dtype) if soft else None)
    impl = _args.implementation(backend, input)
    validate = _validates_by_default(input, impl) if validate is None else bool(validate)
    if _higher.requested(input, target, weight) or _args.weight_grad(weight):
        # a forward tangent, a torch.func transform, or class weights to differentiate
        # (probability targets): PyTorch's differentiable ops
        loss, lse, aux = _higher.cross_entropy(x, t, weight, ignore_index, label_smoothing,
                                               reduction, extras)
    elif torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            input.requires_grad or target.requires_grad)):
        opts = _autograd.Options(ignore_index, label_smoothing, reduction, backend, validate,
                                 _grad_mode(x, t, weight, impl, inplace_backward), extras)
        out = _autograd.CrossEntropyFunction.apply(x, t, weight, opts)
        loss, lse, aux = out if extras.aux else (out, None, None)
    else:  # no gradient to take (no_grad, evaluation): no autograd state at all
        loss, lse, _, _, aux = _loss.forward(x, t, weight, ignore_index, label_smoothing,
                                             reduction, backend, validate, extras)
    if reduction == "none":
        loss = loss.reshape(loss_shape)
    loss = loss.to(out_dtype)
    if not extras.aux:
        return loss
    return _loss.aux_outputs(loss, lse, aux, t, ignore_index, reduction, extras, loss_shape,
                             out_dtype)
