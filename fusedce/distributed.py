"""Vocab-parallel cross-entropy over ``torch.distributed`` (tensor parallelism of the LM head).

Each rank of a process group holds a contiguous slice of the vocabulary: columns
``[s_r, s_r + C_r)`` of every token's logits (Megatron-LM's and torchtitan's split of the
language-model head). The loss is computed without gathering the logits anywhere.

Notation as in ``fusedce/kernels/cross_entropy.py`` (``C`` classes in all, class weights ``w``, all
ones when absent, ``W = sum_c w_c``, label smoothing ``eps``). Rank ``r`` computes over its
slice, per row, with the row's global target ``t``:

    lse_r = log(sum_{c in r} exp(x_c))               (-inf for an empty slice)
    xt_r  = x_t if s_r <= t < s_r + C_r else 0
    sm_r  = sum_{c in r} w_c (lse_r - x_c)            (only with label smoothing)

ONE collective per forward (an all-gather of these 2 or 3 float64 values per row, plus the
slice width, its weight sum W_r and its start, checked to tile ``[0, C)``) gives every rank
every rank's values; each merges them locally, identically, in float64:

    lse  = logsumexp_r lse_r      x_t = sum_r xt_r      C = sum_r C_r
    sm   = sum_c w_c (lse - x_c) = sum_r sm_r + W_r (lse - lse_r)
    loss = (1 - eps) * w_t * (lse - x_t) + eps * sm / C

Every term of ``sm`` is >= 0: logits far from 0 lose nothing to cancellation, as they would
in ``W lse - sum_c w_c x_c`` taken from raw sums. ``lse_r`` goes out in float64 (the
slice's max and log-sum rounded once, as the single-device launchers return their lse) and
``lse`` stays float64 into the backward: a row far from 0 keeps its log-sum (in fp32, at
|x| ~ 1e4, lse - x_t and p = exp(x - lse) would be off by up to 5e-4). The values cost 8
bytes each instead of 4, O(rows) all the same.

The loss extras (``logit_scale``, ``softcap``: elementwise) transform each slice where it is
read, so everything above is of the transformed logits; the z-loss needs only the merged
``lse``. The aux outputs add three values per row to the all-gather: the slice's own entropy
``H_r``, its max ``m_r`` and the global column of its first max ``a_r``; then
``H = sum_r pi_r (H_r + lse - lse_r)`` with ``pi_r = exp(lse_r - lse)`` (terms >= 0), and
the row's first argmax is the smallest ``a_r`` among the slices whose ``m_r`` is the max
(or is NaN: a NaN counts as the largest value, as in ``torch.argmax``).

Megatron-LM's ``vocab_parallel_cross_entropy`` uses three all-reduces here (max, sum of exp,
target logit; two in its fused variant), the max first because its sum of exp is taken
relative to the global max; a per-rank log-sum-exp needs no global max. The backward needs
no collective: on its own slice each rank writes

    dx_c = p_c * a - b * [c == t] - k * w_c,   p_c = exp(x_c - lse)
    a = ((1 - eps) * w_t + eps * W / C) * g,   b = (1 - eps) * w_t * g,   k = eps / C * g

with ``g`` the row's upstream gradient over the reduction's denominator. Communication is
O(rows), independent of the vocabulary. The mean's denominator comes from the global targets
and the full class weights, which every rank has: no collective.

``vocab_parallel_linear_cross_entropy`` is the same loss straight from the hidden states when
each rank holds a slice of the head's weight: the shard's logits exist one chunk of rows at a
time. Its input gradient is a sum over ranks: one all-reduce in the backward, the one every
column-parallel linear layer has (``reduce_input_grad=False`` leaves it to the caller).

float64 logits (or class weights) are computed in float64 on the PyTorch path. Both losses
are differentiable once: a gradient taken with ``create_graph=True`` raises when
differentiated again (``_first_order_only``).
"""


import functools

import torch
import torch.distributed as dist

from . import _args, _autograd, _loss
from ._chunks import GradAccumulator, chunk_rows, logits_into

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_shard_range",
    "even_vocab_shard",
]



# ------------------------------------------------------------------ the collectives


def _all_gather(out, inp, group):
    """``out`` (world * n,) <- every rank's ``inp`` (n,), in rank order.

    Looked up on ``torch.distributed`` at each call (tests count the calls by patching it).
    ``all_gather_single`` is the newer name of ``all_gather_into_tensor``.
    """
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)
    return out


def _check_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fusedce.distributed needs an initialised torch.distributed process "
                           "group (torch.distributed.init_process_group, or torchrun)")
    return dist.get_world_size(group), dist.get_rank(group)


def _gathered_starts(n_local, group, device):
    """Every rank's slice width (int64 (world,)) by one all-gather, and this rank's start as
    a 0-dim int64 device tensor (no host synchronisation)."""
    world, rank = _check_group(group)
    mine = torch.full((1,), n_local, dtype=torch.int64, device=device)
    sizes = _all_gather(torch.empty(world, dtype=torch.int64, device=device), mine, group)
    starts = torch.cumsum(sizes, 0) - sizes
    return sizes, starts[rank]


def vocab_shard_range(n_local, group=None, device=None):
    """``(vocab_start, vocab_size)`` of this rank's slice, as Python ints.

    One all-gather of the slice widths (and a host read of its result): call it once when
    the model is built and pass ``vocab_start`` to every loss call. ``device`` is where the
    collective runs (``cuda`` for NCCL; default: the current CUDA device under NCCL, else CPU).
    """
    if device is None:
        backend = str(dist.get_backend(group)) if dist.is_initialized() else "gloo"
        # "nccl", or a device map such as "cpu:gloo,cuda:nccl": a CUDA device suits both
        on_cuda = "nccl" in backend and torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else "cpu"
    sizes, start = _gathered_starts(int(n_local), group, device)
    return int(start), int(sizes.sum())


def even_vocab_shard(vocab_size, rank, world_size):
    """``(vocab_start, n_local)`` of ``rank`` when ``vocab_size`` classes are split the way
    ``torch.chunk`` and DTensor's ``Shard(dim)`` split them: slices of ``ceil(V / world)``,
    the last ones shorter (or empty). 50,257 over 4 ranks: 12,565 x 3 and 12,562. A rank
    outside ``[0, world_size)``, no rank, or a negative vocabulary raise ValueError."""
    if not (world_size >= 1 and 0 <= rank < world_size and vocab_size >= 0):
        raise ValueError(f"even_vocab_shard(vocab_size={vocab_size}, rank={rank}, "
                         f"world_size={world_size}): expected vocab_size >= 0, "
                         f"world_size >= 1 and 0 <= rank < world_size")
    step = -(-vocab_size // world_size)
    start = min(rank * step, vocab_size)
    return start, min(step, vocab_size - start)


# ---------------------------------------------------------------- the merged loss


class _Shard:
    """What the forward and backward need about this rank's slice and the row targets."""

    def __init__(self, target, n_local, vocab_start, weight, ignore_index, group, acc):
        self.group = group
        self.acc = acc  # the dtype the loss is computed in: float32, or float64
        self.n_local = n_local
        t = target.long()
        self.ignored = t == ignore_index
        if vocab_start is None:
            # the price of not passing vocab_start: a second collective, every call
            _, vocab_start = _gathered_starts(n_local, group, target.device)
        self.vocab_start = vocab_start
        t_local = t - vocab_start
        in_shard = (t_local >= 0) & (t_local < n_local) & ~self.ignored
        self.t_local = torch.where(in_shard, t_local, -1)  # -1: the target is elsewhere
        self.t = t
        if weight is None:
            self.w_shard = None
        elif isinstance(vocab_start, int):
            self.w_shard = weight[vocab_start:vocab_start + n_local].contiguous()
        else:  # a device tensor: index on the device rather than read it back
            idx = vocab_start + torch.arange(n_local, device=weight.device)
            self.w_shard = weight.index_select(0, idx)


# The dtype of the values each rank sends and of the merge, whatever the loss's: lse_r
# rounded to fp32 would lose a row's log-sum to its offset far from 0
_SENT = torch.float64


def _n_parts(smoothing, extras):
    """Per-row values each rank sends: lse_r, xt_r, sm_r (with smoothing), and with aux
    outputs the slice's entropy, max and first argmax (after an sm_r slot)."""
    return 6 if extras.aux else (3 if smoothing else 2)


# Per-rank values sent after the rows': the slice's width, its weight sum and its start
_TRAILER = 3


def _merge(gathered, n_rows, n_parts, smoothing, aux):
    """Every rank's (lse_r, xt_r[, sm_r][, H_r, m_r, a_r]), slice width, weight sum and
    start -> global (lse, x_t, sm, C, (entropy, argmax)), all in ``gathered``'s dtype
    (float64); ``sm = sum_c w_c (lse - x_c)`` (None without smoothing), the last None
    without ``aux``.

    The slices must tile ``[0, C)`` in rank order: each start the sum of the widths
    before it. A ``vocab_start`` that breaks it (a rank's slice placed where another is,
    or past a gap) would merge into a wrong loss; every rank sees the same starts, so on
    CPU tensors every rank raises ValueError, and on a GPU (where raising would read the
    device) every row's lse is NaN: the loss and the gradients.

    The entropy of the row, from each slice's own ``H_r`` and ``pi_r = exp(lse_r - lse)``:
    ``H = sum_r pi_r (H_r + lse - lse_r)``, a sum of terms >= 0. Its first argmax: the
    smallest global column among the slices whose max is the row's (or that hold NaN)."""
    world = gathered.numel() // (n_parts * n_rows + _TRAILER)
    g = gathered.view(world, n_parts * n_rows + _TRAILER)
    parts = g[:, :n_parts * n_rows].view(world, n_parts, n_rows)
    widths, w_r, starts = g[:, -3], g[:, -2:-1], g[:, -1]
    n_classes = widths.sum()  # exact
    tiled = (starts == torch.cumsum(widths, 0) - widths).all()
    if gathered.device.type == "cpu":
        if not bool(tiled):
            raise ValueError(
                f"vocab_start: the ranks' slices do not tile the vocabulary in rank order "
                f"(starts {[int(v) for v in starts.tolist()]} for widths "
                f"{[int(v) for v in widths.tolist()]}); pass each rank's own start "
                f"(vocab_shard_range, even_vocab_shard) or None")
        lse = torch.logsumexp(parts[:, 0], dim=0)  # stable: max-shifted; -inf slices drop out
    else:
        lse = torch.where(tiled, torch.logsumexp(parts[:, 0], dim=0), float("nan"))
    x_t = parts[:, 1].sum(0)
    stats = None
    if aux:
        lse_r, h_r, m_r, a_r = parts[:, 0], parts[:, 3], parts[:, 4], parts[:, 5]
        pi = torch.exp(lse_r - lse)
        entropy = torch.where(pi == 0, 0.0, pi * (h_r + (lse - lse_r))).sum(0)
        first = torch.where(m_r == m_r.amax(0), a_r, float("inf")).amin(0)
        # a slice holding NaN has a NaN max and its first NaN's column: NaN is the largest
        # value to torch.argmax, so the row's argmax is the first of those
        nan_r = m_r.isnan()
        first = torch.where(nan_r.any(0), torch.where(nan_r, a_r, float("inf")).amin(0), first)
        stats = (entropy, first)
    smooth = None
    if smoothing:
        # a slice of weight 0 (empty, or all weights 0) adds nothing (no 0 * inf); one whose
        # logits are all -inf adds +inf, as its classes' -log p do (sm_r is NaN there)
        rebased = torch.where(w_r == 0, 0.0, torch.where(
            parts[:, 0] == float("-inf"), float("inf"), parts[:, 2] + w_r * (lse - parts[:, 0])))
        smooth = rebased.sum(0)
    return lse, x_t, smooth, n_classes, stats


def _loss_and_rows(shard, lse, x_t, smooth, n_classes, weight, eps):
    """Per-row loss in the loss's dtype from the merged values (float64, each row's loss
    rounded once), and the per-row state the backward needs (``w_t``, ``w_sum`` in the
    loss's dtype)."""
    t, ignored = shard.t, shard.ignored
    valid = (t >= 0) & (t < n_classes) & ~ignored
    if weight is None:
        w_t = valid.to(shard.acc)
        w_sum = n_classes
    else:
        t_safe = torch.where(valid, t, 0)
        w_t = torch.where(valid, weight.to(shard.acc)[t_safe], 0.0)
        w_sum = weight.to(shard.acc).sum()
    loss = (1.0 - eps) * w_t.to(lse.dtype) * (lse - x_t)
    if eps > 0:
        loss = loss + eps * (smooth / n_classes)
    loss = torch.where(ignored, 0.0, torch.where(valid, loss, float("nan"))).to(shard.acc)
    return loss, valid, w_t, w_sum


def _denominator(shard, valid, w_t, reduction):
    """The reduction's divisor as a (1,) device tensor in ``w_t``'s dtype, from the global
    targets: the count of rows not ignored, or their summed class weights (PyTorch's
    weighted mean)."""
    if reduction != "mean":
        return torch.ones(1, dtype=w_t.dtype, device=w_t.device)
    if shard.w_shard is None:
        return _loss.nan_if_zero((~shard.ignored).sum(dtype=w_t.dtype).reshape(1))
    return _loss.nan_if_zero(w_t.sum().reshape(1))


def _row_grad_scale(grad_out, n_rows, reduction, denom, ignored, valid):
    """Each row's upstream gradient over the reduction's denominator, (rows,) in the
    loss's dtype, contiguous: 0 for ignored rows, NaN for out-of-range targets (as
    fusedce.cross_entropy)."""
    if reduction == "none":
        g = grad_out.to(denom.dtype)
    else:
        g = grad_out.to(denom.dtype).reshape(1)
        if reduction == "mean":
            g = g / denom
        g = g.expand(n_rows)
    return torch.where(ignored, 0.0, torch.where(valid, g, float("nan"))).contiguous()


def _consts(w_sum, n_classes):
    """``[W, C]`` as a (2,) device tensor in ``n_classes``'s dtype (the loss's)."""
    return torch.stack([torch.as_tensor(w_sum, dtype=n_classes.dtype,
                                        device=n_classes.device), n_classes])


def _forward_partials(x_chunks, shard, eps, impl, n_rows, device, extras):
    """Runs the shard-local pass over ``x_chunks`` (an iterable of (row_start, logits chunk)),
    then the one all-gather; returns ``_merge``'s (lse, x_t, sm, C, aux stats)."""
    n_parts = _n_parts(eps > 0, extras)
    send = torch.empty(n_parts * n_rows + _TRAILER, dtype=_SENT, device=device)
    view = send[:n_parts * n_rows].view(n_parts, n_rows)
    for s, xc in x_chunks:
        e = s + xc.shape[0]
        if s == 0 and e == n_rows:
            # one chunk: the [lse_r | xt_r | sm_r ...] layout is the send buffer's: write there
            impl.vp_partials(xc, shard.t_local, shard.w_shard, eps > 0, send, extras)
            continue
        width = max(3, n_parts)
        part = torch.empty(width * (e - s), dtype=_SENT, device=device)
        impl.vp_partials(xc, shard.t_local[s:e], shard.w_shard, eps > 0, part, extras)
        view[:, s:e] = part.view(width, e - s)[:n_parts]
    if extras.aux:
        view[5] += shard.vocab_start  # the slice's column -> the global class
    send[-3:-2].fill_(float(shard.n_local))
    if shard.w_shard is None:
        send[-2:-1].fill_(float(shard.n_local))
    else:  # on the device: no host sync
        send[-2:-1].copy_(shard.w_shard.sum(dtype=_SENT).reshape(1))
    if isinstance(shard.vocab_start, int):
        send[-1:].fill_(float(shard.vocab_start))
    else:  # derived: a device tensor
        send[-1:].copy_(shard.vocab_start.to(_SENT).reshape(1))
    world, _ = _check_group(shard.group)
    recv = torch.empty(world * send.numel(), dtype=_SENT, device=device)
    _all_gather(recv, send, shard.group)
    return _merge(recv, n_rows, n_parts, eps > 0, extras.aux)


def _check_weight_count(weight, n_classes):
    """The class weights must cover the C classes the collective found (the front door saw
    only this rank's slice). Checked where reading C costs no device sync: CPU tensors."""
    if weight is not None and weight.device.type == "cpu" and weight.numel() != n_classes:
        raise RuntimeError(f"weight tensor should be defined either for all "
                           f"{int(n_classes)} classes or no classes but got weight tensor "
                           f"of shape: {list(weight.shape)} (pass the full class-weight "
                           f"vector on every rank)")


def _merged_loss(ctx, x_chunks, shard, weight, ignore_index, eps, reduction, impl, n_rows,
                 device, extras):
    """The forward both Functions share: partials, the all-gather, the merged loss reduced
    (z-loss included). Returns the Function's outputs (``(loss, lse, aux)`` with aux
    outputs) and the per-row state the backward needs, ``(lse, valid, w_t, consts,
    denom)``, for ``save_for_backward``."""
    lse, x_t, smooth, n_classes, stats = _forward_partials(x_chunks, shard, eps, impl, n_rows,
                                                           device, extras)
    _check_weight_count(weight, n_classes)
    loss, valid, w_t, w_sum = _loss_and_rows(shard, lse, x_t, smooth, n_classes, weight, eps)
    n_classes = n_classes.to(shard.acc)  # exact in fp32 below 2**24 classes
    denom = _denominator(shard, valid, w_t, reduction)
    rows = (lse, valid, w_t, _consts(w_sum, n_classes), denom)
    loss = _loss.reduce(loss, denom, reduction)
    if extras.z_loss:
        loss = _loss.add_z_loss(loss, lse, shard.t, ignore_index, reduction, extras,
                                (n_rows,))
    if not extras.aux:
        return loss, rows
    entropy, first = stats
    correct = (valid & (first == shard.t)).to(shard.acc)
    aux = torch.stack([entropy.to(shard.acc), correct])
    ctx.mark_non_differentiable(lse, aux)
    return (loss, lse, aux), rows


def _shard_grad_args(ctx, grad_out, n_rows, lse, valid, denom):
    """``(g, z_grad)`` of the backward: each row's upstream gradient over the denominator
    (masked) and the z-loss's per-row gradient factor (None without a z-loss)."""
    shard, (ignore_index, _, reduction, extras) = ctx.shard, ctx.options[:4]
    g = _row_grad_scale(grad_out, n_rows, reduction, denom, shard.ignored, valid)
    z_grad = (_loss.z_grad(grad_out, lse, shard.t, ignore_index, reduction, extras)
              if extras.z_loss else None)
    return g, z_grad


_SECOND_DERIVATIVE = (
    b"fusedce's vocab-parallel loss (vocabulary-sharded logits or LM head, DTensor or "
    b"fusedce.distributed) has no second derivative: its gradient was taken with "
    b"create_graph=True (a gradient penalty, a Hessian-vector product) and then "
    b"differentiated. Compute that loss with PyTorch's ops instead (outside "
    b"fusedce.patched(), or F.cross_entropy on the gathered logits)")


def _first_order_only(backward):
    """The backward of a Function whose backward is not differentiable (collectives,
    in-place kernels). Under ``create_graph=True`` its gradients come out of a node that
    raises ``_SECOND_DERIVATIVE`` when differentiated, a node whose inputs are also the
    saved inputs and upstream gradients that require grad, so that every path of a second
    derivative meets it. ``torch.autograd.function.once_differentiable`` links only the
    upstream gradients: ``autograd.grad(loss, x, create_graph=True)`` then gave a gradient
    whose dependence on ``x`` was silently left out."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        tracked = [i for i, g in enumerate(out) if g is not None]
        if not (torch.is_grad_enabled() and tracked):
            return out
        links = [t for t in (*ctx.saved_tensors, *grads)
                 if isinstance(t, torch.Tensor) and t.requires_grad]
        delayed = torch._C._functions.DelayedError(_SECOND_DERIVATIVE,
                                                   len(tracked) + len(links))(
            *[out[i].detach().requires_grad_() for i in tracked], *links)
        out = list(out)
        for i, g in zip(tracked, delayed):
            out[i] = g
        return tuple(out)

    return wrapper


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Reduced cross-entropy of this rank's logit slice ``x`` (rows, C_r); see the module
    docstring. One all-gather in the forward, nothing in the backward; saves O(rows). With
    aux outputs (``extras.aux``) it returns ``(loss, lse, aux)`` as
    ``fusedce._autograd.CrossEntropyFunction`` does."""

    @staticmethod
    def forward(ctx, x, target, weight, vocab_start, group, ignore_index, eps, reduction,
                impl, extras):
        n_rows, n_local = x.shape
        shard = _Shard(target, n_local, vocab_start, weight, ignore_index, group,
                       _loss.acc_dtype(x, target, weight))
        ctx.options = (ignore_index, eps, reduction, extras, impl)
        ctx.shard = shard
        out, rows = _merged_loss(ctx, [(0, x)], shard, weight, ignore_index, eps, reduction,
                                 impl, n_rows, x.device, extras)
        ctx.save_for_backward(x, *rows)
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out, *_aux_grads):
        x, lse, valid, w_t, consts, denom = ctx.saved_tensors
        _, eps, _, extras, impl = ctx.options
        shard = ctx.shard
        g, z_grad = _shard_grad_args(ctx, grad_out, x.shape[0], lse, valid, denom)
        dx = impl.vp_grad(x, shard.t_local, lse, g, w_t, consts, eps, shard.w_shard,
                          extras=extras, z_grad=z_grad)
        return (dx,) + (None,) * 9


def _check_call(fn, target, n_rows, weight, reduction, label_smoothing, ignore_index, backend):
    """The front door's checks; returns the checked options and the class weights."""
    reduction, label_smoothing, ignore_index, backend = _args.loss_options(
        fn, reduction, label_smoothing, ignore_index, backend)
    _args.vocab_parallel_target(target, n_rows)
    # the full (C,) vector: C is known only after the forward's collective
    weight = _args.class_weight(weight, None, fn=f"fusedce.{fn}")
    return reduction, label_smoothing, ignore_index, backend, weight


@_autograd.no_graph_in_inference_mode
def vocab_parallel_cross_entropy(logits_shard, target, *, group=None, vocab_start=None,
                                 ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                 weight=None, backend="auto", logit_scale=1.0, softcap=None,
                                 lse_square_scale=0.0, return_aux=False):
    """Cross-entropy of logits split along the vocabulary over the ranks of ``group``.

    logits_shard: (N, C_r) or (C_r,), this rank's contiguous slice ``[vocab_start,
        vocab_start + C_r)`` of the logits; slices may differ in width (even be empty) and
        must tile ``[0, C)`` in rank order.
    target: (N,) or () class indices in the **global** vocabulary, the same on every rank.
    vocab_start: where this rank's slice begins (an int). ``None`` derives it by an
        all-gather of the slice widths: a second collective on every call. Compute it once
        with :func:`vocab_shard_range` (or :func:`even_vocab_shard` for DTensor's split).
    weight: the **full** (C,) class-weight vector, the same on every rank (each rank needs
        ``w_t`` of targets in other slices, and ``W = sum w``, without a collective).
    ignore_index, reduction, label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    backend: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch for CPU tensors),
        ``"triton"`` or ``"torch"``.
    logit_scale, softcap, lse_square_scale, return_aux: the loss extras of
        :func:`fusedce.cross_entropy`, on the full logits: each rank transforms its own
        slice; with ``return_aux`` every rank gets the full ``CrossEntropyAux``.

    Every rank returns the same loss, the loss of ``fusedce.cross_entropy`` on the full
    logits; the backward gives each rank the gradient of its own slice. Collectives: one
    all-gather of ``2 * N + 3`` float64 values (``3 * N + 3`` with label smoothing,
    ``6 * N + 3`` with ``return_aux``), whatever the logits' dtype, per forward, none in the
    backward (plus one small all-gather per forward when ``vocab_start`` is None). All ranks
    must call it together (it is a collective).
    """
    _args.vocab_parallel_logits(logits_shard)
    extras = _args.extras(logit_scale, softcap, lse_square_scale, return_aux)
    if logits_shard.dim() == 1:
        out = vocab_parallel_cross_entropy(
            logits_shard.unsqueeze(0), target.reshape(1), group=group, vocab_start=vocab_start,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            weight=weight, backend=backend, **extras.kwargs())
        return _loss.one_token(out, reduction, extras)
    reduction, label_smoothing, ignore_index, backend, weight = _check_call(
        "vocab_parallel_cross_entropy", target, logits_shard.shape[0], weight, reduction,
        label_smoothing, ignore_index, backend)
    # float64 on the PyTorch path (the kernels compute in float32), as fusedce.cross_entropy
    impl = _loss.extras_implementation(backend, logits_shard, target, weight)
    if logits_shard.stride(1) != 1:
        logits_shard = logits_shard.contiguous()
    if vocab_start is not None:
        vocab_start = int(vocab_start)
    out = _VocabParallelCrossEntropy.apply(logits_shard, target, weight, vocab_start, group,
                                           ignore_index, label_smoothing, reduction, impl,
                                           extras)
    return _results(out, target, ignore_index, reduction, extras, logits_shard.dtype)


def _results(out, target, ignore_index, reduction, extras, dtype):
    """The loss in ``dtype``, or the ``CrossEntropyAux`` of a Function's outputs."""
    if not extras.aux:
        return out.to(dtype)
    loss, lse, aux = out
    return _loss.aux_outputs(loss.to(dtype), lse, aux, target, ignore_index, reduction,
                             extras, (target.shape[0],), dtype)


# ----------------------------------------------------- the linear form (slice of the head)


def _head_chunks(h, w_head, b_head, chunk):
    """This rank's logits, ``chunk`` rows at a time, in one reused (chunk, C_r) buffer: the
    slice's full logits never exist. Each chunk must be used up before the next."""
    buf = torch.empty(min(chunk, h.shape[0]), w_head.shape[0], dtype=h.dtype, device=h.device)
    for s in range(0, h.shape[0], chunk):
        e = min(s + chunk, h.shape[0])
        yield s, logits_into(buf[:e - s], h[s:e], w_head, b_head)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ w_head.T + b_head`` where ``w_head`` (C_r, H) is this rank's
    slice of the head. Forward: one pass of chunks for the partials, one all-gather. Backward:
    the chunks' logits are recomputed (the global lse is only known after the all-gather),
    then ``dW_r``, ``db_r`` stay local and ``dh`` is summed over ranks by one all-reduce.
    The chunk products and gradient sums are fusedce.linear's (``logits_into``,
    ``GradAccumulator``)."""

    @staticmethod
    def forward(ctx, h, w_head, b_head, target, weight, vocab_start, group, ignore_index, eps,
                reduction, impl, chunk, reduce_input_grad, extras):
        n_rows = h.shape[0]
        shard = _Shard(target, w_head.shape[0], vocab_start, weight, ignore_index, group,
                       _loss.acc_dtype(h, target, weight))
        ctx.options = (ignore_index, eps, reduction, extras, impl, chunk, reduce_input_grad)
        ctx.shard = shard
        out, rows = _merged_loss(ctx, _head_chunks(h, w_head, b_head, chunk), shard, weight,
                                 ignore_index, eps, reduction, impl, n_rows, h.device, extras)
        ctx.save_for_backward(h, w_head, b_head, *rows)
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out, *_aux_grads):
        h, w_head, b_head, lse, valid, w_t, consts, denom = ctx.saved_tensors
        _, eps, _, extras, impl, chunk, reduce_input_grad = ctx.options
        shard = ctx.shard
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g, z_grad = _shard_grad_args(ctx, grad_out, h.shape[0], lse, valid, denom)
        grads = GradAccumulator(h, w_head, need_h, need_w, need_b and b_head is not None)
        for s, logits in _head_chunks(h, w_head, b_head, chunk):
            e = s + logits.shape[0]
            # the chunk's logit gradient overwrites its logits (recomputed, read by nobody else)
            dlogits = impl.vp_grad(logits, shard.t_local[s:e], lse[s:e], g[s:e], w_t[s:e],
                                   consts, eps, shard.w_shard, logits, extras=extras,
                                   z_grad=None if z_grad is None else z_grad[s:e])
            grads.add(dlogits, h[s:e], s, e)
        dh, dw, db = grads.grad_input, grads.grad_weight, grads.grad_bias
        if dh is not None and reduce_input_grad:
            # h feeds every rank's slice: its gradient is the sum of the ranks' contributions
            dist.all_reduce(dh, group=shard.group)
        dw = dw.to(w_head.dtype) if dw is not None else None
        db = db.to(b_head.dtype) if db is not None else None
        return (dh, dw, db) + (None,) * 11


@_autograd.no_graph_in_inference_mode
def vocab_parallel_linear_cross_entropy(input, linear_weight, target, *, linear_bias=None,
                                        group=None, vocab_start=None, weight=None,
                                        reduction="mean", ignore_index=-100,
                                        label_smoothing=0.0, chunk_size=None,
                                        reduce_input_grad=True, backend="auto",
                                        logit_scale=1.0, softcap=None, lse_square_scale=0.0,
                                        return_aux=False):
    """Cross-entropy of ``input @ W.T + b`` with the head split along the vocabulary.

    input: (N, H) hidden states, the same on every rank.
    linear_weight: (C_r, H), this rank's rows ``[vocab_start, vocab_start + C_r)`` of the
        head's weight; linear_bias: (C_r,) the matching slice of its bias, or None.
    target, vocab_start, weight, ignore_index, reduction, label_smoothing, backend, and the
        loss extras: as in :func:`vocab_parallel_cross_entropy` (``weight`` is the full
        (C,) class weights).
    chunk_size: rows of logits computed at a time (default: ``fusedce.linear.chunk_rows``
        for this rank's slice width).
    reduce_input_grad: all-reduce the input's gradient over ``group`` (default). Pass False
        when the caller's framework does it already (Megatron's
        ``copy_to_tensor_model_parallel_region``, DTensor's Replicate input): each rank then
        gets only its own slice's contribution.

    Every rank returns the same loss; gradients: ``linear_weight`` and ``linear_bias`` of
    this rank's slice, and ``input`` (summed over ranks). Collectives: one all-gather per
    forward (as in :func:`vocab_parallel_cross_entropy`), one all-reduce of the (N, H) input
    gradient per backward. The peak extra memory is one chunk of (chunk_size, C_r) logits;
    the price is a second logits matrix product in the backward.
    """
    _args.vocab_parallel_linear(input, linear_weight)
    extras = _args.extras(logit_scale, softcap, lse_square_scale, return_aux)
    reduction, label_smoothing, ignore_index, backend, weight = _check_call(
        "vocab_parallel_linear_cross_entropy", target, input.shape[0], weight, reduction,
        label_smoothing, ignore_index, backend)
    impl = _loss.extras_implementation(backend, input, target, weight)
    if chunk_size is None:  # fusedce.linear's choice, for this rank's (N, C_r) logits
        chunk_size = chunk_rows(input.shape[0], input.shape[1], linear_weight.shape[0],
                                input.element_size(), input.device.type)
    chunk_size = max(1, int(chunk_size))
    if vocab_start is not None:
        vocab_start = int(vocab_start)
    out = _VocabParallelLinearCrossEntropy.apply(
        input, linear_weight, linear_bias, target, weight, vocab_start, group,
        ignore_index, label_smoothing, reduction, impl, chunk_size,
        bool(reduce_input_grad), extras)
    return _results(out, target, ignore_index, reduction, extras, input.dtype)
