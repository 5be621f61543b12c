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
- ``Replicate()``: every rank computes the loss of its full copy.

The loss is a DTensor ``Replicate()`` ('none' with ``Shard(0)`` logits: ``Shard(0)``); the
gradient of the logits a DTensor with their placements. Nothing here runs unless a DTensor
is passed: ``import fusedce`` imports nothing of ``torch.distributed``.
"""

import sys

import torch

from . import _loss


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


def serves(x):
    """Whether fusedce takes these DTensor logits (``fusedce.patched()`` leaves the others,
    which ``fusedce.cross_entropy`` refuses, to PyTorch's own loss)."""
    try:
        _layout(x, "")
    except NotImplementedError:
        return False
    return True


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


def cross_entropy(ce, input, target, weight, ignore_index, reduction, label_smoothing,
                  backend, extras):
    """``fusedce.cross_entropy`` (``ce``) of DTensor logits; see the module docstring."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    fn = "fusedce.cross_entropy"
    layout = _layout(input, fn)
    mesh = input.device_mesh
    weight = _full(weight)
    if layout == "vocab":
        from .distributed import even_vocab_shard, vocab_parallel_cross_entropy

        start, _ = even_vocab_shard(input.shape[1], mesh.get_local_rank(), mesh.size())
        out = vocab_parallel_cross_entropy(
            input.to_local(), _full(target), group=mesh.get_group(), vocab_start=start,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            weight=weight, backend=backend, **extras.kwargs())
        return _wrap_out(out, mesh, Replicate(), extras)
    local = input.to_local()
    if layout == "replicate":
        out = ce(local, _full(target), weight, ignore_index=ignore_index, reduction=reduction,
                 label_smoothing=label_smoothing, backend=backend, **extras.kwargs())
        return _wrap_out(out, mesh, Replicate(), extras)
    # batch-sharded: this rank's rows
    if is_dtensor(target) and target.placements == input.placements:
        t = target.to_local()
    else:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(input.shape, mesh,
                                                          input.placements)
        t = _full(target)[offset[0]:offset[0] + local.shape[0]]
    if reduction == "none":
        out = ce(local, t, weight, ignore_index=ignore_index, reduction="none",
                 label_smoothing=label_smoothing, backend=backend, **extras.kwargs())
        return _wrap_out(out, mesh, Shard(0), extras, shape=(input.shape[0],))
    if extras.z_loss or extras.aux:
        raise NotImplementedError(
            f"{fn}: lse_square_scale and return_aux with batch-sharded (Shard(0)) DTensor "
            f"logits take reduction='none'")
    total = ce(local, t, weight, ignore_index=ignore_index, reduction="sum",
               label_smoothing=label_smoothing, backend=backend, **extras.kwargs())
    parts = total.float().reshape(1)
    if reduction == "mean":
        n_cols = input.shape[1]
        denom = _loss.denominator(t, weight, ignore_index, n_cols, "mean",
                                  nan_for_zero=False)
        parts = torch.cat([parts, denom])
    summed = _wrap(parts, mesh, Partial()).redistribute(mesh, [Replicate()]).to_local()
    loss = summed[0] if reduction == "sum" else summed[0] / _loss.nan_if_zero(summed[1:])[0]
    return _wrap(loss.to(total.dtype), mesh, Replicate())


def linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight, reduction,
                         ignore_index, label_smoothing, backend, chunk_size, extras):
    """``fusedce.linear_cross_entropy`` with a DTensor head ``linear_weight`` (C, H) on a
    1-d mesh: ``Shard(0)`` (vocabulary-sharded) runs
    ``fusedce.distributed.vocab_parallel_linear_cross_entropy`` on this rank's rows (the
    bias, if a DTensor, sharded alike); the input plain (the same on every rank: its
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
    bias = linear_bias.to_local() if is_dtensor(linear_bias) else linear_bias
    from .distributed import even_vocab_shard, vocab_parallel_linear_cross_entropy

    start, _ = even_vocab_shard(linear_weight.shape[0], mesh.get_local_rank(), mesh.size())
    out = vocab_parallel_linear_cross_entropy(
        x, linear_weight.to_local(), _full(target), linear_bias=bias,
        group=mesh.get_group(), vocab_start=start, weight=_full(weight), reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, chunk_size=chunk_size,
        reduce_input_grad=reduce_input_grad, backend=backend, **extras.kwargs())
    return _wrap_out(out, mesh, Replicate(), extras)
