"""``fusedce.cross_entropy`` on DTensor logits (PyTorch's distributed engine).

(N, V) logits on a 1-d device mesh, by placement:

- ``Shard(1)`` (vocabulary-sharded: what ``loss_parallel`` and a column-parallel LM head
  produce): each rank's slice goes to ``fusedce.distributed.vocab_parallel_cross_entropy``
  with DTensor's split rule for its first class (uneven slices included): one all-gather of
  O(N) per-row statistics in the forward, none in the backward. Targets and class weights
  are the full ones (plain tensors, or DTensors made full).
- ``Shard(0)`` (batch-sharded, data parallel): the local fused loss of each rank's rows,
  reduced to the global result; 'mean' and 'sum' take one all-reduce of two numbers in the
  forward (the summed loss and the mean's divisor), none in the backward; 'none' stays
  sharded. Targets are this rank's rows (a DTensor ``Shard(0)``) or all of them (plain).
  With ``return_aux`` the same all-reduce (one for 'none') also sums the z-loss and the
  counts behind the accuracy, the batch's; a z-loss with 'mean' is refused. A check that
  could fail on some ranks only (the targets' length, ``validate``) runs on every rank
  before the collective; the targets of a ``Shard(0)`` DTensor, which each rank sees only
  in part, are validated through one more number in that all-reduce.
- ``Replicate()``: every rank computes the loss of its full copy.

Sums are taken in the dtype the loss is computed in (float32, float64 for float64 logits)
and rounded to the result's dtype once. A second
derivative through the vocab-parallel loss raises (``fusedce.distributed``).

The loss is a DTensor ``Replicate()`` ('none' with ``Shard(0)`` logits: ``Shard(0)``); the
gradient of the logits a DTensor with their placements. Nothing here runs unless a DTensor
is passed: ``import fusedce`` imports nothing of ``torch.distributed``.
"""

import sys

import torch

from . import _args, _loss


def is_dtensor(t):
    """Whether ``t`` is a DTensor. Imports nothing: while ``torch.distributed.tensor`` is
    not imported no DTensor can exist."""
    if t is None or type(t) is torch.Tensor:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _layout(x, fn):
    """'vocab', 'batch' or 'replicate' for DTensor logits ``x``; clear errors otherwise."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"{fn}: DTensor logits on a 1-d device mesh only, got a {mesh.ndim}-d mesh "
            f"{tuple(mesh.shape)} (flatten it, or pass a DTensor on the mesh dimension that "
            f"shards the logits)")
    (placement,) = x.placements
    if isinstance(placement, Replicate):
        return "replicate"
    if not isinstance(placement, Shard):
        raise NotImplementedError(
            f"{fn}: DTensor logits placed {placement} are not supported (Partial logits "
            f"are pending sums: redistribute them to Shard(0), Shard(1) or Replicate())")
    if x.dim() != 2:
        raise NotImplementedError(
            f"{fn}: sharded DTensor logits must be (N, C), got shape {tuple(x.shape)}")
    return "vocab" if placement.dim % 2 == 1 else "batch"


def serves(x, target=None):
    """Whether fusedce takes these DTensor logits and this target (``fusedce.patched()``
    leaves the others, which ``fusedce.cross_entropy`` refuses, to PyTorch's own loss):
    not the layouts ``_layout`` refuses, nor class-probability targets of vocabulary-sharded
    logits (the vocab-parallel loss takes class indices)."""
    try:
        layout = _layout(x, "")
    except NotImplementedError:
        return False
    return not (layout == "vocab" and target is not None and target.is_floating_point())


def _full(t):
    """A target or class-weight argument as a plain tensor holding all of it."""
    return t.full_tensor() if is_dtensor(t) else t


def _wrap(value, mesh, placement, shape=None):
    from torch.distributed.tensor import DTensor

    if shape is None:
        return DTensor.from_local(value, mesh, [placement], run_check=False)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value, mesh, [placement], run_check=False, shape=shape,
                              stride=stride)


def _wrap_out(out, mesh, placement, extras, shape=None):
    if not extras.aux:
        return _wrap(out, mesh, placement, shape)
    return out._replace(**{k: _wrap(v, mesh, placement, shape if v.dim() else None)
                           for k, v in out._asdict().items()})


def _validates(validate, local, backend):
    """``validate``, with None made ``fusedce.cross_entropy``'s default: CPU tensors on the
    PyTorch path."""
    if validate is not None:
        return bool(validate)
    impl = _args.implementation(_args.backend(backend), local)
    return local.device.type == "cpu" and _args.is_cpu_impl(impl)


def _batch_size_error(n_input, n_target):
    return ValueError(f"Expected input batch_size ({n_input}) to match target batch_size "
                      f"({n_target}).")


def _bad_targets(t, n_cols, ignore_index):
    """The count of this rank's class indices outside ``[0, C)`` (not ignored), 0-d."""
    t = t.reshape(-1).long()
    return ((t != ignore_index) & ((t < 0) | (t >= n_cols))).sum()


def _raise_bad_targets(t, n_cols, ignore_index, bad_here):
    """After the collective that found a bad target somewhere: PyTorch's IndexError on the
    rank that holds it, an IndexError saying where it is on the others."""
    if bad_here:
        _loss.check_targets(t, n_cols, ignore_index)
    raise IndexError("Target is out of bounds (a class index outside [0, "
                     f"{n_cols}) in another rank's rows of the batch-sharded target)")


def cross_entropy(ce, input, target, weight, ignore_index, reduction, label_smoothing,
                  backend, extras, validate=None):
    """``fusedce.cross_entropy`` (``ce``) of DTensor logits; see the module docstring."""
    from torch.distributed.tensor import Replicate, Shard

    fn = "fusedce.cross_entropy"
    layout = _layout(input, fn)
    mesh = input.device_mesh
    weight = _full(weight)
    local = input.to_local()
    validate = _validates(validate, local, backend)
    if layout == "vocab":
        from .distributed import even_vocab_shard, vocab_parallel_cross_entropy

        t = _full(target)
        if validate and not t.is_floating_point():
            # every rank holds every target: all raise alike, before the collective
            _loss.check_targets(t, input.shape[1], ignore_index)
        start, _ = even_vocab_shard(input.shape[1], mesh.get_local_rank(), mesh.size())
        out = vocab_parallel_cross_entropy(
            local, t, group=mesh.get_group(), vocab_start=start,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            weight=weight, backend=backend, **extras.kwargs())
        return _wrap_out(out, mesh, Replicate(), extras)
    if layout == "replicate":
        out = ce(local, _full(target), weight, ignore_index=ignore_index, reduction=reduction,
                 label_smoothing=label_smoothing, backend=backend, validate=validate,
                 **extras.kwargs())
        return _wrap_out(out, mesh, Replicate(), extras)
    n_rows, n_cols = input.shape
    # batch-sharded: this rank's rows. Every check that may fail on some ranks only is done
    # on all of them before the collective (or rides on it): else the others would hang
    bad = None
    if is_dtensor(target) and target.placements == input.placements:
        if target.dim() == 0 or target.shape[0] != n_rows:
            raise _batch_size_error(n_rows, target.shape[0] if target.dim() else 0)
        t = target.to_local()
        if validate and not t.is_floating_point():
            bad = _bad_targets(t, n_cols, ignore_index)  # this rank's rows only
    else:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        full_t = _full(target)
        if full_t.dim() == 0 or full_t.shape[0] != n_rows:
            raise _batch_size_error(n_rows, full_t.shape[0] if full_t.dim() else 0)
        if validate and not full_t.is_floating_point():
            _loss.check_targets(full_t, n_cols, ignore_index)  # on every rank alike
        _, offset = compute_local_shape_and_global_offset(input.shape, mesh,
                                                          input.placements)
        t = full_t[offset[0]:offset[0] + local.shape[0]]
    if reduction == "mean" and extras.z_loss:
        raise NotImplementedError(
            f"{fn}: lse_square_scale with batch-sharded (Shard(0)) DTensor logits takes "
            f"reduction='sum' or 'none' (the z-loss's 'mean' divides by another count than "
            f"the loss's)")
    if bad is not None and reduction == "none" and not extras.aux:
        _loss.check_targets(t, n_cols, ignore_index)  # no collective here: none can hang
        bad = None
    out_dtype = _args.ce_result_dtype(local, t, weight, t.is_floating_point())
    # a rank's partial sum of fp16/bf16 logits unrounded (under autocast fusedce's loss
    # comes out in fp32, computed alike), rounded once after the all-reduce
    low = reduction != "none" and local.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(local.device.type, dtype=local.dtype, enabled=low):
        out = ce(local, t, weight, ignore_index=ignore_index,
                 reduction="none" if reduction == "none" else "sum",
                 label_smoothing=label_smoothing, backend=backend, validate=False,
                 **extras.kwargs())
    if reduction == "none" and not extras.aux:
        return _wrap(out, mesh, Shard(0), shape=(n_rows,))
    return _batch_reduced(out, local, t, weight, ignore_index, reduction, n_rows, n_cols,
                          extras, bad, mesh, out_dtype)


def _batch_reduced(out, local, t, weight, ignore_index, reduction, n_rows, n_cols, extras,
                   bad, mesh, out_dtype):
    """The global results of batch-sharded logits from this rank's (``out``: the summed
    loss or the rows' losses, or with aux outputs their ``CrossEntropyAux``): one
    all-reduce of the loss's sum and the mean's divisor, with aux outputs also the z-loss's
    sum and the counts of rows correct and not ignored (the accuracy is the batch's), and
    of the ``bad`` targets where they are checked here. Summed in the dtype the loss is
    computed in (float32, or float64)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    acc = _loss.acc_dtype(local, t, weight)
    loss = out.loss if extras.aux else out
    parts = []
    if reduction != "none":
        parts.append(loss.to(acc).reshape(1))
        if reduction == "mean":
            parts.append(_loss.denominator(t, weight, ignore_index, n_cols, "mean",
                                           dtype=acc, nan_for_zero=False))
    if extras.aux:
        kept = _loss.kept_rows(t, ignore_index).sum(dtype=acc)
        # the local accuracy times its divisor: a count, exactly (NaN where none is kept)
        correct = torch.where(kept > 0, (out.accuracy.to(acc) * kept).round(), 0.0)
        parts.append(torch.stack([out.z_loss.detach().to(acc).sum(), correct, kept]))
    if bad is not None:
        parts.append(bad.to(acc).reshape(1))
    summed = _wrap(torch.cat(parts), mesh, Partial()).redistribute(mesh, [Replicate()])
    summed = summed.to_local()
    if bad is not None and bool(summed[-1] > 0):
        _raise_bad_targets(t, n_cols, ignore_index, bool(bad > 0))
    rows = (n_rows,)
    if reduction == "none":
        result = _wrap(loss, mesh, Shard(0), shape=rows)
    else:
        total = summed[0] if reduction == "sum" else summed[0] / _loss.nan_if_zero(summed[1:2])[0]
        result = _wrap(total.to(out_dtype), mesh, Replicate())
    if not extras.aux:
        return result
    first = {"none": 0, "sum": 1, "mean": 2}[reduction]
    z_sum, correct, kept = summed[first:first + 3]
    kept = _loss.nan_if_zero(kept.reshape(1))[0]
    if reduction == "none":
        z_loss = _wrap(out.z_loss, mesh, Shard(0), shape=rows)
    else:
        z_loss = _wrap((z_sum if reduction == "sum" else z_sum / kept).to(out_dtype), mesh,
                       Replicate())
    return out._replace(loss=result, z_loss=z_loss,
                        lse=_wrap(out.lse, mesh, Shard(0), shape=rows),
                        accuracy=_wrap(correct / kept, mesh, Replicate()),
                        entropy=_wrap(out.entropy, mesh, Shard(0), shape=rows))


def linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight, reduction,
                         ignore_index, label_smoothing, backend, chunk_size, extras):
    """``fusedce.linear_cross_entropy`` with a DTensor head ``linear_weight`` (C, H) on a
    1-d mesh: ``Shard(0)`` (vocabulary-sharded) runs
    ``fusedce.distributed.vocab_parallel_linear_cross_entropy`` on this rank's rows (and
    this rank's slice of the bias, ``_bias_shard``); the input plain (the same on every rank: its
    gradient is all-reduced) or a ``Replicate()`` DTensor (its gradient left ``Partial``
    for DTensor to sum). The loss is a ``Replicate()`` DTensor; the weight's gradient a
    ``Shard(0)`` DTensor."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    fn = "fusedce.linear_cross_entropy"
    mesh = linear_weight.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"{fn}: a DTensor linear_weight on a 1-d device mesh only, "
                                  f"got a {mesh.ndim}-d mesh {tuple(mesh.shape)}")
    (placement,) = linear_weight.placements
    if linear_weight.dim() != 2 or not (isinstance(placement, Shard) and placement.dim == 0):
        raise NotImplementedError(
            f"{fn}: a DTensor linear_weight must be (C, H) placed Shard(0) (a vocabulary-"
            f"sharded head), got shape {tuple(linear_weight.shape)} placed {placement}")
    if is_dtensor(input):
        if tuple(input.placements) != (Replicate(),):
            raise NotImplementedError(f"{fn}: a DTensor input must be placed Replicate(), "
                                      f"got {input.placements}")
        x, reduce_input_grad = input.to_local(grad_placements=[Partial()]), False
    else:
        x, reduce_input_grad = input, True
    from .distributed import even_vocab_shard, vocab_parallel_linear_cross_entropy

    start, n_local = even_vocab_shard(linear_weight.shape[0], mesh.get_local_rank(),
                                      mesh.size())
    bias = _bias_shard(linear_bias, linear_weight, mesh, start, n_local, fn)
    out = vocab_parallel_linear_cross_entropy(
        x, linear_weight.to_local(), _full(target), linear_bias=bias,
        group=mesh.get_group(), vocab_start=start, weight=_full(weight), reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, chunk_size=chunk_size,
        reduce_input_grad=reduce_input_grad, backend=backend, **extras.kwargs())
    return _wrap_out(out, mesh, Replicate(), extras)


def _bias_shard(bias, linear_weight, mesh, start, n_local, fn):
    """This rank's slice ``[start, start + n_local)`` of the head's (C,) bias: a ``Shard(0)``
    DTensor split as the weight is (its local part), a ``Replicate()`` DTensor (its gradient
    left ``Partial``: DTensor sums the ranks' slices) or a plain full tensor, the same on
    every rank (its gradient summed over the ranks in the backward, as a plain input's)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    if bias is None:
        return None
    n_classes = linear_weight.shape[0]
    if tuple(bias.shape) != (n_classes,):
        raise RuntimeError(f"{fn}: linear_bias must be the head's full ({n_classes},) bias "
                           f"(a DTensor, or a plain tensor), got shape {tuple(bias.shape)}")
    if is_dtensor(bias):
        if bias.device_mesh != mesh:
            raise NotImplementedError(f"{fn}: a DTensor linear_bias must be on "
                                      f"linear_weight's device mesh")
        (placement,) = bias.placements
        if isinstance(placement, Shard) and placement.dim == 0:
            return bias.to_local()
        if not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"{fn}: a DTensor linear_bias must be placed Shard(0) (as the head) or "
                f"Replicate(), got {placement}")
        full = bias.to_local(grad_placements=[Partial()])
    elif bias.requires_grad:
        full = DTensor.from_local(bias, mesh, [Replicate()], run_check=False).to_local(
            grad_placements=[Partial()])
    else:
        full = bias
    return full[start:start + n_local]
