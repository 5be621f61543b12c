"""fusedce.distributed against the single-process loss on the full logits.

One group of 2 and one of 4 CPU processes (gloo, rendezvous through a file in a tmp dir) run
every case listed below in one go (each spawn imports torch: seconds), and write their
results to files; the parametrised tests then check them case by case. Each case builds
the same full logits on every rank from a seed, takes the rank's slice, and compares the
vocab-parallel loss and the gradient of the slice with ``F.cross_entropy`` in float64 (and
with ``fusedce.cross_entropy`` in the same dtype), through ``torch.autograd.grad`` with a
random upstream gradient. Fresh ``torch.empty`` buffers are NaN-filled in the workers, so a
missed write shows up.
"""

import csv
import dataclasses
import datetime
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib

import helpers
import nan_fill
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    # the workers inherit the environment; Triton must see this before it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPT2_VOCAB = 50_257
SPAWN_TIMEOUT_S = 150  # a whole group, start to finish; a hung collective fails the test
COLLECTIVE_TIMEOUT_S = 45


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    sizes: tuple  # the ranks' slice widths, in rank order (sum: the vocabulary)
    rows: int = 6
    reduction: str = "mean"
    ignore_index: int = -100
    ignored_every: int = 0  # every k-th row's target is ignore_index (0: none)
    label_smoothing: float = 0.0
    weight: bool = False
    dtype: str = "float32"
    backend: str = "torch"
    pass_vocab_start: bool = True
    targets: str = "random"  # "random" | "boundaries" (first and last class of each slice)
    shift: float = 0.0  # added to every logit (translation invariance)
    one_d: bool = False  # (C_r,) logits and a 0-dim target
    kind: str = "ce"  # "ce" | "linear" | "dtensor" | "subgroups"
    hidden: int = 0  # for "linear" / "dtensor"
    bias: bool = False
    chunk_size: int = 0
    threads: int = 1  # torch threads for the call (> 1: the CPU path's worker threads)
    tol: float = 0.0  # overrides the dtype's loss and grad tolerances (with the reason)
    loss_tol: float = 0.0  # then overrides the loss's alone
    extras: tuple = ()  # (name, value) pairs of the loss extras (logit_scale, softcap, ...)
    placement: str = "vocab"  # "dtensor-ce": "vocab" Shard(1), "batch" Shard(0), "replicate"
    dtensor_target: bool = False  # "dtensor-ce": the target a DTensor too
    patched: bool = False  # "dtensor-ce": F.cross_entropy under fusedce.patched() and
    # loss_parallel()

    @property
    def vocab(self):
        return sum(self.sizes)


def _ids(cases):
    return [c.id for c in cases]


EXTRAS = (("logit_scale", 1.7), ("softcap", 4.0), ("lse_square_scale", 1e-2),
          ("return_aux", True))

# Two ranks: every option on a small odd vocabulary split unevenly, the kernel path.
CASES_2 = [
    Case("mean", (4, 7)),
    Case("sum", (4, 7), reduction="sum"),
    Case("none", (4, 7), reduction="none"),
    Case("ignore-mean", (4, 7), ignored_every=3),
    Case("ignore-index-is-a-class", (6, 5), ignore_index=5, ignored_every=2,
         reduction="none"),  # class 5 is in rank 1's slice but means "ignore"
    Case("all-ignored-mean-is-nan", (4, 7), ignored_every=1),
    Case("smoothing", (4, 7), label_smoothing=0.1),
    Case("weight-mean", (4, 7), weight=True, ignored_every=4),
    Case("weight-smoothing-none", (4, 7), weight=True, label_smoothing=0.3,
         reduction="none", ignored_every=3),
    Case("boundary-targets", (5, 6), targets="boundaries", rows=8, label_smoothing=0.2,
         weight=True),
    # logits far from 0, where one fp32 ulp of the lse (6e-5 at 1000, 1e-3 at 1e4, 0.06 at
    # 1e6) would be the loss's and p's error: each slice's lse goes out in float64 (max and
    # log-sum rounded once) and the merged lse stays float64 into the backward. With fp32
    # lse these were 1e-4 (1000), 6e-5 and 1e-4 (1e4) and 2e-3 and 1e-2 (1e6) off
    Case("shift-1000", (4, 7), shift=1000.0, label_smoothing=0.1),
    Case("shift-1e6-weight-smoothing-none", (4, 7), shift=1e6, label_smoothing=0.3,
         weight=True, reduction="none"),
    # logits near 1e4 with full smoothing over GPT-2's vocabulary: the per-rank sums are
    # taken relative to each slice's lse and merged as sums of terms >= 0; raw sums
    # (W lse - sum w x, both near 5e8 in fp32) were off by about 1e-4 relative
    Case("gpt2-vocab-shift-1e4-smoothing", (25_129, 25_128), rows=4, shift=1e4,
         label_smoothing=1.0, weight=True, reduction="none"),
    Case("derive-vocab-start", (3, 8), pass_vocab_start=False, weight=True,
         label_smoothing=0.1),
    Case("one-d", (4, 7), one_d=True, rows=1, reduction="sum"),
    Case("empty-batch", (4, 7), rows=0),
    Case("bf16", (40, 57), dtype="bfloat16", label_smoothing=0.1, rows=8),
    Case("gpt2-vocab-2-ranks", (25_129, 25_128), rows=4, ignored_every=4),
    # 96 x 25,129 logits per rank: enough for the CPU path to split rows over 2 workers
    Case("gpt2-vocab-2-workers", (25_129, 25_128), rows=96, threads=2, weight=True,
         label_smoothing=0.1, reduction="none"),
    # the Triton kernels, under the interpreter on a CPU machine
    Case("triton-plain", (16, 21), backend="triton"),
    Case("triton-weight-smoothing-none", (16, 21), backend="triton", weight=True,
         label_smoothing=0.2, reduction="none", ignored_every=3, targets="boundaries"),
    Case("triton-bf16", (16, 21), backend="triton", dtype="bfloat16", label_smoothing=0.1),
    # slices wider than one block (8,192 columns), odd: several body blocks, head and tail
    Case("triton-wide-slices", (8_195, 8_202), backend="triton", rows=3, weight=True,
         label_smoothing=0.1, reduction="none", targets="boundaries"),
    # the kernels' per-rank sums and float64 lse at 1e4 and 1e6, as the cases above
    Case("triton-shift-1e4-smoothing", (8_195, 8_202), backend="triton", rows=2, shift=1e4,
         label_smoothing=1.0, weight=True, reduction="none"),
    Case("triton-shift-1e6", (16, 21), backend="triton", shift=1e6, label_smoothing=0.1,
         reduction="none"),
    # the linear form: hidden 13 (odd), chunks of 4 rows over 10 (a short last chunk)
    Case("linear-mean", (9, 14), kind="linear", hidden=13, rows=10, chunk_size=4,
         ignored_every=4),
    Case("linear-bias-weight-smoothing-none", (9, 14), kind="linear", hidden=13, rows=10,
         chunk_size=4, bias=True, weight=True, label_smoothing=0.1, reduction="none"),
    Case("linear-triton", (9, 14), kind="linear", hidden=13, rows=10, chunk_size=4,
         bias=True, backend="triton", label_smoothing=0.1),
    # bf16 head: fp32 weight-gradient sums, a bf16 all-reduce of the input gradient; the
    # default chunk size (one chunk here)
    Case("linear-bf16", (40, 57), kind="linear", hidden=24, rows=12, dtype="bfloat16",
         bias=True, weight=True, label_smoothing=0.1),
    # the loss extras: each rank transforms its slice; z-loss and aux from the merged lse,
    # the entropy and first argmax merged from the slices' own
    Case("extras-all", (4, 7), extras=EXTRAS, weight=True, label_smoothing=0.1,
         ignored_every=3, reduction="none"),
    Case("extras-mean-ties", (5, 6), extras=(("softcap", 2.0), ("return_aux", True)),
         shift=-1e3, rows=4),  # every logit caps to -2: ties across ranks, argmax column 0
    Case("extras-triton", (16, 21), backend="triton", extras=EXTRAS, weight=True,
         label_smoothing=0.1, ignored_every=3),
    Case("extras-linear", (9, 14), kind="linear", hidden=13, rows=10, chunk_size=4,
         bias=True, extras=EXTRAS, reduction="none", ignored_every=4),
    Case("extras-linear-triton", (9, 14), kind="linear", hidden=13, rows=10, chunk_size=4,
         backend="triton", extras=EXTRAS, label_smoothing=0.1),
    # the extras' passes far from 0 (a scale of 0.5 is exact: the reference sees the same z)
    Case("extras-shift-1e4", (4, 7), shift=1e4, reduction="none", label_smoothing=0.1,
         extras=(("logit_scale", 0.5), ("lse_square_scale", 1e-6), ("return_aux", True))),
    Case("extras-triton-shift-1e4", (16, 21), backend="triton", shift=1e4, weight=True,
         extras=(("logit_scale", 0.5), ("lse_square_scale", 1e-6), ("return_aux", True))),
    # a bias of 2**20 puts every logit of the linear form far from 0 (its inputs small
    # integers, the bias in eighths: logits exact in fp32, the reference's own)
    Case("linear-far-bias", (9, 14), kind="linear", hidden=5, rows=10, chunk_size=4,
         bias=True, shift=2.0 ** 20, label_smoothing=0.1, reduction="none"),
    Case("linear-far-bias-triton", (9, 14), kind="linear", hidden=5, rows=10, chunk_size=4,
         bias=True, shift=2.0 ** 20, backend="triton", weight=True),
    # DTensor logits on 2 ranks (DTensor splits 11 classes 6 + 5, 7 rows 4 + 3)
    Case("dt2-vocab-smoothing-weight", (6, 5), kind="dtensor-ce", label_smoothing=0.1,
         weight=True, ignored_every=3),
    Case("dt2-vocab-triton-bf16-none", (6, 5), kind="dtensor-ce", backend="triton",
         dtype="bfloat16", reduction="none"),
    Case("dt2-batch-mean", (4, 3), kind="dtensor-ce", placement="batch", rows=7,
         ignored_every=2, weight=True),
    Case("dt2-batch-bf16-sum", (4, 3), kind="dtensor-ce", placement="batch", rows=7,
         dtype="bfloat16", reduction="sum", dtensor_target=True),
    Case("dt2-linear-head", (6, 5), kind="dtensor-linear", hidden=8, rows=6, bias=True,
         label_smoothing=0.1),
]

# Four ranks: the GPT-2 vocabulary split as DTensor/torch.chunk does (12,565 x 3 and
# 12,562), a split with an empty slice, DTensor's ColwiseParallel head.
CASES_4 = [
    Case("gpt2-vocab-mean", (12_565, 12_565, 12_565, 12_562), ignored_every=3,
         targets="boundaries", rows=8),
    Case("gpt2-vocab-weight-smoothing-none", (12_565, 12_565, 12_565, 12_562),
         weight=True, label_smoothing=0.1, reduction="none"),
    Case("gpt2-vocab-sum-derive-start", (12_565, 12_565, 12_565, 12_562), reduction="sum",
         pass_vocab_start=False),
    Case("empty-slice", (3, 0, 5, 2), targets="boundaries", label_smoothing=0.1, rows=8),
    Case("triton-4-ranks", (7, 9, 1, 6), backend="triton", weight=True, label_smoothing=0.1,
         ignored_every=4, targets="boundaries", rows=8),
    Case("linear-gpt2-vocab", (12_565, 12_565, 12_565, 12_562), kind="linear", hidden=16,
         rows=6, chunk_size=4, weight=True, label_smoothing=0.1),
    Case("dtensor-colwise-lm-head", (6, 6, 6, 5), kind="dtensor", hidden=12, rows=6,
         ignored_every=3),
    # tensor parallel inside data parallel: two independent groups of 2 ranks ({0, 1} and
    # {2, 3}, different data), each splitting 11 classes as (5, 6); the rank in the group,
    # not the global rank, places the slice (vocab_start derived, so it matters)
    Case("two-tp-groups-of-2", (5, 6), kind="subgroups", pass_vocab_start=False,
         label_smoothing=0.1, weight=True, reduction="sum"),
    Case("extras-empty-slice", (3, 0, 5, 2), extras=EXTRAS, label_smoothing=0.1, rows=8,
         targets="boundaries", pass_vocab_start=False),
]

# Three ranks, fusedce.cross_entropy on DTensor logits: GPT-2's vocabulary split unevenly by
# DTensor (16,753 x 2 and 16,751), batches of rows split unevenly (7 rows: 3, 3, 1).
GPT2_3 = (16_753, 16_753, 16_751)
CASES_3 = [
    Case("dt-vocab-mean", GPT2_3, kind="dtensor-ce", ignored_every=3, targets="boundaries"),
    Case("dt-vocab-weight-smoothing-none", GPT2_3, kind="dtensor-ce", weight=True,
         label_smoothing=0.1, reduction="none", dtensor_target=True),
    Case("dt-vocab-all-ignored", GPT2_3, kind="dtensor-ce", ignored_every=1),
    Case("dt-vocab-bf16-sum", GPT2_3, kind="dtensor-ce", dtype="bfloat16", reduction="sum"),
    Case("dt-vocab-extras", GPT2_3, kind="dtensor-ce", extras=EXTRAS, label_smoothing=0.1),
    # rows near 1e4: the slices' lse merged in float64 (fp32: 6e-5 off the loss)
    Case("dt-vocab-shift-1e4", (4, 4, 3), kind="dtensor-ce", shift=1e4, weight=True,
         label_smoothing=0.1, reduction="none"),
    Case("dt-vocab-patched-loss-parallel", GPT2_3, kind="dtensor-ce", patched=True,
         weight=True, ignored_every=4),
    Case("dt-batch-mean", (4, 4, 3), kind="dtensor-ce", placement="batch", rows=7,
         weight=True, ignored_every=3, label_smoothing=0.1),
    Case("dt-batch-sum-dtensor-target", (4, 4, 3), kind="dtensor-ce", placement="batch",
         rows=7, reduction="sum", dtensor_target=True),
    Case("dt-batch-none", (4, 4, 3), kind="dtensor-ce", placement="batch", rows=7,
         reduction="none", dtensor_target=True, ignored_every=2),
    Case("dt-batch-all-ignored-mean", (4, 4, 3), kind="dtensor-ce", placement="batch",
         rows=7, ignored_every=1, label_smoothing=0.1),
    Case("dt-batch-triton-bf16", (4, 4, 3), kind="dtensor-ce", placement="batch", rows=7,
         backend="triton", dtype="bfloat16"),
    Case("dt-replicate", (4, 4, 3), kind="dtensor-ce", placement="replicate", rows=5),
    Case("dt-errors", (4, 4, 3), kind="dtensor-errors"),
    Case("dt-linear-head-mean", GPT2_3, kind="dtensor-linear", hidden=16, rows=6,
         chunk_size=4, ignored_every=3, bias=True),
    Case("dt-linear-head-replicated-input", GPT2_3, kind="dtensor-linear", hidden=16, rows=6,
         weight=True, label_smoothing=0.1, reduction="sum", dtensor_target=True),
    # last: before the fixes some of its checks left ranks waiting in a collective
    Case("dt-contract", (3, 2, 2), kind="dtensor-contract", rows=6),
]

# (dtype, loss rtol, grad atol relative to the largest reference gradient)
TOLERANCES = {"float32": (2e-5, 2e-5), "bfloat16": (2e-2, 2e-2)}


# ------------------------------------------------------------------------ in the workers


_COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
                "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce", "gather",
                "scatter", "all_to_all", "all_to_all_single", "barrier", "send", "recv",
                "isend", "irecv", "all_gather_object", "broadcast_object_list")


class CollectiveCounter:
    """Counts the torch.distributed collectives called (outermost calls only: one
    collective implemented through another counts once)."""

    def __init__(self):
        self.calls = []
        self.sent = []  # per outermost call: (name, elements, dtype) of the tensor it sends
        self._depth = 0

    def install(self):
        import torch.distributed as dist

        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.calls.append(name)
                self.sent.append(_sent(name, args, kwargs))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls

    def take_sent(self):
        sent, self.sent = self.sent, []
        return sent


def _sent(name, args, kwargs):
    """``(name, elements, dtype)`` of the tensor a collective sends (the input of a gather,
    the tensor of an all-reduce); elements None where it is not a single tensor."""
    key, pos = ("input_tensor", 1) if name.startswith("all_gather") else ("tensor", 0)
    tensor = kwargs.get(key, args[pos] if len(args) > pos else None)
    if isinstance(tensor, torch.Tensor):
        return name, tensor.numel(), str(tensor.dtype)
    return name, None, None


class FunctionalCollectives(TorchDispatchMode):
    """Records ``(op, elements, dtype)`` of each functional collective dispatched (those
    DTensor's redistributions issue), the sizes CommDebugMode does not give."""

    def __init__(self):
        super().__init__()
        self.sent = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and not name.startswith(("wait", "_")):
            tensor = args[0]  # not waits, nor the autograd wrapper of a result
            self.sent.append((name, tensor.numel(), str(tensor.dtype)))
        return func(*args, **(kwargs or {}))


def _targets(case, gen):
    if case.targets == "boundaries":
        starts = [sum(case.sizes[:r]) for r in range(len(case.sizes))]
        edges = []
        for start, size in zip(starts, case.sizes):
            if size:
                edges += [start, start + size - 1]
        t = torch.tensor([edges[i % len(edges)] for i in range(case.rows)], dtype=torch.long)
    else:
        t = torch.randint(0, case.vocab, (case.rows,), generator=gen)
    if case.ignored_every:
        t[::case.ignored_every] = case.ignore_index
    return t


def _seed(case):
    # not hash(): string hashes differ between processes, the ranks must agree
    return zlib.crc32(case.id.encode())


def _rel_err(a, b):
    """max |a - b| over max |b| (1 when b is all zero), NaNs in the same places."""
    a, b = a.double(), b.double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    keep = ~torch.isnan(b)
    if keep.sum() == 0:
        return 0.0
    scale = b[keep].abs().max().clamp_min(1e-30) if b[keep].abs().max() > 0 else 1.0
    return float((a[keep] - b[keep]).abs().max() / scale)


def _run_ce(case, rank, counter, group=None):

    import fusedce
    from fusedce.distributed import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(_seed(case))
    dtype = getattr(torch, case.dtype)
    logits = (torch.randn(case.rows, case.vocab, generator=gen) * 3 + case.shift).to(dtype)
    target = _targets(case, gen)
    weight = torch.rand(case.vocab, generator=gen) + 0.5 if case.weight else None
    grad_shape = (case.rows,) if case.reduction == "none" else ()
    upstream = torch.randn(grad_shape, generator=gen)
    opts = dict(ignore_index=case.ignore_index, reduction=case.reduction,
                label_smoothing=case.label_smoothing)

    extras = dict(case.extras)
    full = logits.double().requires_grad_()
    ref_all = _reference(full, target, weight, opts, extras)
    ref = ref_all[0]
    (ref_grad,) = torch.autograd.grad(ref, full, upstream.double())
    full_same = logits.clone().requires_grad_()
    # the case's backend: "auto" would hand these small logits to PyTorch's loss
    fused = fusedce.cross_entropy(full_same, target, weight=weight, backend=case.backend,
                                  **opts, **extras)
    fused = fused.loss if case.extras else fused
    (fused_grad,) = torch.autograd.grad(fused, full_same, upstream.to(dtype))

    start = sum(case.sizes[:rank])
    cols = slice(start, start + case.sizes[rank])
    shard = logits[:, cols].clone().requires_grad_()
    x, t = shard, target
    if case.one_d:
        x, t = shard[0], target[0]
    counter.take()
    counter.take_sent()
    threads = torch.get_num_threads()
    torch.set_num_threads(case.threads)
    try:
        out = vocab_parallel_cross_entropy(
            x, t, vocab_start=start if case.pass_vocab_start else None, weight=weight,
            backend=case.backend, group=group, **opts, **extras)
        loss = out.loss if extras.get("return_aux") else out
        fwd_sent = counter.take_sent()
        fwd_calls = counter.take()
        (grad,) = torch.autograd.grad(loss, shard, upstream.to(dtype).reshape(loss.shape))
        bwd_calls = counter.take()
    finally:
        torch.set_num_threads(threads)
    shard_range = None
    if not case.pass_vocab_start:  # the set-up helper finds the same slice
        from fusedce.distributed import vocab_shard_range

        shard_range = vocab_shard_range(case.sizes[rank], group)
        counter.take()
    ref_loss = ref.detach().reshape(loss.shape)
    workers = [th for th in threading.enumerate() if th.name.startswith("fusedce_")]
    aux_errs = _aux_errors(out, ref_all, extras, case.one_d)
    return {
        **aux_errs,
        "shard_range": shard_range,
        "worker_threads": len(workers),
        "loss": loss.detach().double(),
        "loss_err": _rel_err(loss.detach(), ref_loss),
        "loss_err_vs_fused": _rel_err(loss.detach(), fused.detach().reshape(loss.shape)),
        "grad_err": _rel_err(grad, ref_grad[:, cols]),
        "grad_err_vs_fused": _rel_err(grad, fused_grad[:, cols]),
        "fwd_calls": fwd_calls,
        "fwd_sent": fwd_sent,
        "bwd_calls": bwd_calls,
    }


def _reference(full, target, weight, opts, extras):
    """``(loss, z_loss, lse, accuracy, entropy)`` of the full float64 logits: PyTorch's
    loss without extras, else tests/test_extras.py's reference of their definitions."""
    import torch.nn.functional as F

    w = None if weight is None else weight.double()
    if not extras:
        return (F.cross_entropy(full, target, weight=w, **opts),)
    from test_extras import reference

    kw = {k: v for k, v in extras.items() if k != "return_aux"}
    return reference(full, target, w, **opts, **kw)


def _aux_errors(out, ref_all, extras, one_d):
    """Relative errors of the aux outputs against the reference's (none without them)."""
    if not extras.get("return_aux"):
        return {}
    _, z_loss, lse, accuracy, entropy = ref_all
    if one_d:
        lse, entropy = lse[0], entropy[0]
    return {"z_loss_err": _rel_err(out.z_loss.detach(), z_loss.detach()),
            "lse_err": _rel_err(out.lse, lse.detach()),
            "entropy_err": _rel_err(out.entropy, entropy.detach()),
            "accuracy_err": _rel_err(out.accuracy, accuracy.detach())}


def _run_linear(case, rank, counter):
    import torch.nn.functional as F

    from fusedce.distributed import vocab_parallel_linear_cross_entropy

    gen = torch.Generator().manual_seed(_seed(case))
    if case.shift:  # exact logits far from 0: small integers, a bias in eighths
        hidden = torch.randint(-2, 3, (case.rows, case.hidden), generator=gen).float()
        head = torch.randint(-2, 3, (case.vocab, case.hidden), generator=gen).float()
        bias = case.shift + torch.randint(-16, 17, (case.vocab,), generator=gen).float() / 8
    else:
        hidden = torch.randn(case.rows, case.hidden, generator=gen)
        head = torch.randn(case.vocab, case.hidden, generator=gen) / case.hidden**0.5
        bias = torch.randn(case.vocab, generator=gen) if case.bias else None
    target = _targets(case, gen)
    weight = torch.rand(case.vocab, generator=gen) + 0.5 if case.weight else None
    upstream = torch.randn((case.rows,) if case.reduction == "none" else (), generator=gen)
    opts = dict(ignore_index=case.ignore_index, reduction=case.reduction,
                label_smoothing=case.label_smoothing)

    leaves = [hidden.double().requires_grad_(), head.double().requires_grad_()]
    if bias is not None:
        leaves.append(bias.double().requires_grad_())
    logits = F.linear(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    extras = dict(case.extras)
    ref_all = _reference(logits, target, weight, opts, extras)
    ref = ref_all[0]
    ref_grads = torch.autograd.grad(ref, leaves, upstream.double())

    start = sum(case.sizes[:rank])
    cols = slice(start, start + case.sizes[rank])
    dtype = getattr(torch, case.dtype)
    mine = [hidden.to(dtype).requires_grad_(), head[cols].to(dtype).requires_grad_()]
    if bias is not None:
        mine.append(bias[cols].to(dtype).requires_grad_())
    counter.take()
    res = vocab_parallel_linear_cross_entropy(
        mine[0], mine[1], target, linear_bias=mine[2] if bias is not None else None,
        vocab_start=start, weight=weight, chunk_size=case.chunk_size, backend=case.backend,
        **opts, **extras)
    loss = res.loss if extras.get("return_aux") else res
    fwd_calls = counter.take()
    grads = torch.autograd.grad(loss, mine, upstream.to(dtype))
    bwd_calls = counter.take()
    out = {
        **_aux_errors(res, ref_all, extras, False),
        "loss": loss.detach().double(),
        "loss_err": _rel_err(loss.detach(), ref.detach()),
        "grad_err": _rel_err(grads[0], ref_grads[0]),  # the input: summed over ranks
        "weight_grad_err": _rel_err(grads[1], ref_grads[1][cols]),
        "fwd_calls": fwd_calls,
        "bwd_calls": bwd_calls,
    }
    if bias is not None:
        out["bias_grad_err"] = _rel_err(grads[2], ref_grads[2][cols])
    return out


def _run_dtensor(case, rank, counter):
    """The README's recipe: a ColwiseParallel lm_head whose output stays a Shard(-1)
    DTensor, its local slice into the loss, vocab_start from DTensor's split rule. The
    hidden states' gradient is summed over the ranks by DTensor itself."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from fusedce.distributed import even_vocab_shard, vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(_seed(case))
    hidden = torch.randn(2, case.rows // 2, case.hidden, generator=gen)  # (batch, time, H)
    head_w = torch.randn(case.vocab, case.hidden, generator=gen)
    target = _targets(case, gen).view(2, case.rows // 2)
    upstream = torch.randn((), generator=gen)

    ref_h, ref_w = hidden.double().requires_grad_(), head_w.double().requires_grad_()
    ref = F.cross_entropy((ref_h @ ref_w.T).flatten(0, 1), target.flatten(),
                          ignore_index=case.ignore_index)
    ref_dh, ref_dw = torch.autograd.grad(ref, (ref_h, ref_w), upstream.double())

    mesh = init_device_mesh("cpu", (len(case.sizes),))
    lm_head = torch.nn.Linear(case.hidden, case.vocab, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(head_w)
    parallelize_module(lm_head, mesh, ColwiseParallel(output_layouts=Shard(-1),
                                                      use_local_output=False))
    h = hidden.clone().requires_grad_()
    logits = lm_head(h)  # a DTensor, Shard(-1): (batch, time, C_r) on each rank
    vocab_start, n_local = even_vocab_shard(case.vocab, mesh.get_local_rank(), mesh.size())
    local = logits.to_local()
    loss = vocab_parallel_cross_entropy(local.flatten(0, 1), target.flatten(),
                                        vocab_start=vocab_start,
                                        ignore_index=case.ignore_index)
    loss.backward(upstream)
    w_grad = lm_head.weight.grad.to_local()
    cols = slice(vocab_start, vocab_start + n_local)
    # the README's shorter recipe: the DTensor logits, flattened, to fusedce.cross_entropy
    lm_head.weight.grad = None
    h2 = hidden.clone().requires_grad_()
    import fusedce

    loss2 = fusedce.cross_entropy(lm_head(h2).flatten(0, 1), target.flatten(),
                                  ignore_index=case.ignore_index)
    loss2.backward(DTensor.from_local(upstream, mesh, [Replicate()]))
    counter.take()
    return {
        "front_loss_err": _rel_err(loss2.full_tensor().detach(), ref.detach()),
        "weight_grad_err": _rel_err(lm_head.weight.grad.full_tensor(), ref_dw),
        "input_grad_err_front": _rel_err(h2.grad, ref_dh),
        "loss": loss.detach().double(),
        "loss_err": _rel_err(loss.detach(), ref.detach()),
        "grad_err": _rel_err(w_grad, ref_dw[cols]),
        "input_grad_err": _rel_err(h.grad, ref_dh),
        "local_shape_ok": tuple(local.shape) == (2, case.rows // 2, n_local)
                          and n_local == case.sizes[rank],
    }


def _run_dtensor_ce(case, rank, counter):
    """``fusedce.cross_entropy`` (or, patched, ``F.cross_entropy`` inside ``loss_parallel()``)
    on DTensor logits placed as ``case.placement``; the loss and the full gradient against
    float64 PyTorch, the gradient's placements, the collectives of forward and backward."""
    import contextlib

    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel

    import fusedce

    gen = torch.Generator().manual_seed(_seed(case))
    dtype = getattr(torch, case.dtype)
    logits = (torch.randn(case.rows, case.vocab, generator=gen) * 3 + case.shift).to(dtype)
    target = _targets(case, gen)
    weight = torch.rand(case.vocab, generator=gen) + 0.5 if case.weight else None
    upstream = torch.randn((case.rows,) if case.reduction == "none" else (), generator=gen)
    opts = dict(ignore_index=case.ignore_index, reduction=case.reduction,
                label_smoothing=case.label_smoothing)
    extras = dict(case.extras)
    full = logits.double().requires_grad_()
    ref_all = _reference(full, target, weight, opts, extras)
    (ref_grad,) = torch.autograd.grad(ref_all[0], full, upstream.double())

    mesh = init_device_mesh("cpu", (len(case.sizes),))
    placement = {"vocab": Shard(1), "batch": Shard(0), "replicate": Replicate()}[
        case.placement]
    x = distribute_tensor(logits, mesh, [placement]).requires_grad_()
    t = target
    if case.dtensor_target:
        t = distribute_tensor(target, mesh, [Shard(0) if case.placement == "batch"
                                             else Replicate()])
    counter.take()
    context = contextlib.ExitStack()
    if case.patched:
        context.enter_context(loss_parallel())
        context.enter_context(fusedce.patched())
    with context, CommDebugMode() as fwd_comm, FunctionalCollectives() as fwd_functional:
        if case.patched:  # patched: F.cross_entropy sends the call to fusedce ("auto")
            out = F.cross_entropy(x, t, weight=weight, **opts)
        else:  # the case's backend: "auto" would hand a rank's small slice to PyTorch
            out = fusedce.cross_entropy(x, t, weight=weight, backend=case.backend, **opts,
                                        **extras)
    fwd_calls = counter.take()
    loss = out.loss if extras.get("return_aux") else out
    up = distribute_tensor(upstream.to(dtype), mesh, list(loss.placements))
    with CommDebugMode() as bwd_comm:
        (grad,) = torch.autograd.grad(loss, x, up)
    bwd_calls = counter.take()
    if extras.get("return_aux"):
        out = out._replace(**{k: v.full_tensor() for k, v in out._asdict().items()})
    return {
        **_aux_errors(out, ref_all, extras, False),
        "loss": loss.full_tensor().detach().double(),
        "loss_err": _rel_err(loss.full_tensor().detach(), ref_all[0].detach()),
        "grad_err": _rel_err(grad.full_tensor(), ref_grad),
        "grad_placements_ok": tuple(grad.placements) == (placement,),
        "loss_placements": str(tuple(loss.placements)),
        # torch.distributed's collectives called, and every collective op dispatched (those
        # of DTensor's redistributions, and the ones under the former)
        "fwd_calls": fwd_calls,
        "bwd_calls": bwd_calls,
        "comm_counts": (fwd_comm.get_total_counts(), bwd_comm.get_total_counts()),
        "fwd_functional_sent": fwd_functional.sent,
    }


def _run_dtensor_linear(case, rank, counter):
    """``fusedce.linear_cross_entropy`` with a Shard(0) DTensor head (and bias), the input
    plain or (``dtensor_target``) a Replicate() DTensor, against float64 PyTorch."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import fusedce

    gen = torch.Generator().manual_seed(_seed(case))
    h = torch.randn(case.rows, case.hidden, generator=gen)
    w = torch.randn(case.vocab, case.hidden, generator=gen) * case.hidden ** -0.5
    b = torch.randn(case.vocab, generator=gen) if case.bias else None
    target = _targets(case, gen)
    weight = torch.rand(case.vocab, generator=gen) + 0.5 if case.weight else None
    upstream = torch.randn((), generator=gen)
    opts = dict(ignore_index=case.ignore_index, reduction=case.reduction,
                label_smoothing=case.label_smoothing)
    refs = [t.double().requires_grad_() for t in (h, w) + ((b,) if case.bias else ())]
    ref = F.cross_entropy(F.linear(*refs), target,
                          weight=None if weight is None else weight.double(), **opts)
    ref_grads = torch.autograd.grad(ref, refs, upstream.double())

    mesh = init_device_mesh("cpu", (len(case.sizes),))
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_() if case.bias else None
    hp = h.clone().requires_grad_()
    x = DTensor.from_local(hp, mesh, [Replicate()]) if case.dtensor_target else hp
    from torch.distributed.tensor.debug import CommDebugMode

    counter.take()
    with CommDebugMode() as fwd_comm:
        loss = fusedce.linear_cross_entropy(x, wd, target, linear_bias=bd, weight=weight,
                                            chunk_size=case.chunk_size or None, **opts)
    fwd_calls = counter.take()
    up = distribute_tensor(upstream, mesh, [Replicate()])
    with CommDebugMode() as bwd_comm:
        grads = torch.autograd.grad(loss, [hp, wd] + ([bd] if case.bias else []), up)
    bwd_calls = counter.take()
    out = {
        "fwd_calls": fwd_calls,
        "bwd_calls": bwd_calls,
        "comm_counts": (fwd_comm.get_total_counts(), bwd_comm.get_total_counts()),
        "loss": loss.full_tensor().detach().double(),
        "loss_err": _rel_err(loss.full_tensor().detach(), ref.detach()),
        "grad_err": _rel_err(grads[1].full_tensor(), ref_grads[1]),
        "input_grad_err": _rel_err(grads[0], ref_grads[0]),
        "grad_placements_ok": tuple(grads[1].placements) == (Shard(0),),
    }
    if case.bias:
        out["bias_grad_err"] = _rel_err(grads[2].full_tensor(), ref_grads[2])
    return out


def _run_dtensor_errors(case, rank, counter):
    """What fusedce.cross_entropy refuses on DTensor logits, and the messages."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import fusedce

    mesh = init_device_mesh("cpu", (len(case.sizes),))
    mesh_2d = init_device_mesh("cpu", (len(case.sizes), 1), mesh_dim_names=("a", "b"))
    t = torch.zeros(6, dtype=torch.long)
    attempts = {
        "partial": lambda: DTensor.from_local(torch.zeros(6, 11), mesh, [Partial()]),
        "mesh-2d": lambda: distribute_tensor(torch.zeros(6, 11), mesh_2d, [Shard(1), Shard(0)]),
        "shard-2": lambda: distribute_tensor(torch.zeros(6, 11, 3), mesh, [Shard(2)]),
        "z-loss-batch-mean": lambda: distribute_tensor(torch.zeros(6, 11), mesh, [Shard(0)]),
    }
    out = {}
    for name, make in attempts.items():
        kwargs = {"lse_square_scale": 1e-2} if name == "z-loss-batch-mean" else {}
        target = t.view(6, 1).expand(6, 3) if name == "shard-2" else t
        try:
            fusedce.cross_entropy(make(), target, **kwargs)
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the type and message are the result
            out[name] = f"{type(e).__name__}: {e}"
    # fusedce.patched() leaves what fusedce refuses to PyTorch's own loss
    import torch.nn.functional as F

    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    with fusedce.patched():
        patched = F.cross_entropy(distribute_tensor(logits, mesh_2d, [Shard(1), Shard(0)]),
                                  distribute_tensor(t, mesh_2d, [Replicate(), Replicate()]))
    out["patched-mesh-2d-err"] = float((patched.full_tensor() - F.cross_entropy(logits, t))
                                       .abs().max())
    counter.take()
    return {"errors": out}


def _outcome(fn):
    """``fn()``'s result, or ``"TypeName: message"`` of what it raised."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the type and message are the result
        return f"{type(e).__name__}: {e}"


def _run_dtensor_contract(case, rank, counter):
    """The drop-in contract on DTensor logits (7 classes split 3, 2, 2; 6 rows split 2, 2,
    2), checks batched into one job: each value a relative error against float64 PyTorch
    (or fusedce on the full tensors, for the aux outputs) with random upstream gradients,
    or the ``"Type: message"`` of what a call raised. The calls that must raise come last,
    those that once left some ranks waiting in a collective at the very end."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fusedce

    mesh = init_device_mesh("cpu", (len(case.sizes),))
    gen = torch.Generator().manual_seed(_seed(case))
    rows, vocab = case.rows, case.vocab
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3
    full32 = logits.float()
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[1] = -100
    weight = torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.5
    soft = torch.softmax(torch.randn(rows, vocab, generator=gen, dtype=torch.float64), 1)
    h = torch.randn(rows, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64)
    up_rows = torch.randn(rows, generator=gen, dtype=torch.float64)
    up = torch.randn((), generator=gen, dtype=torch.float64)
    out = {}

    def versus_pytorch(x_full, t, placement, upstream, call, **opts):
        """``call(x, t)`` on ``x_full`` placed as ``placement`` against F.cross_entropy."""
        ref_x = x_full.detach().double().clone().requires_grad_()
        ref = F.cross_entropy(ref_x, t.double() if t.is_floating_point() else t, **opts)
        (ref_g,) = torch.autograd.grad(ref, ref_x, upstream)
        x = distribute_tensor(x_full, mesh, [placement]).requires_grad_()
        loss = call(x, t)
        (g,) = torch.autograd.grad(loss, x, distribute_tensor(upstream.to(loss.dtype), mesh,
                                                              list(loss.placements)))
        return max(_rel_err(loss.full_tensor().detach(), ref.detach()),
                   _rel_err(g.full_tensor(), ref_g))

    def linear_errors(h, w, b, b_placement):
        """A Shard(0) head ``w`` and its bias ``b`` placed as ``b_placement`` (None: plain)
        against float64 PyTorch: the loss and the gradients of all three."""
        refs = [t.detach().double().clone().requires_grad_() for t in (h, w, b)]
        ref = F.cross_entropy(F.linear(*refs), target)
        ref_grads = torch.autograd.grad(ref, refs, up)
        wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        bd = (b.clone().requires_grad_() if b_placement is None
              else distribute_tensor(b, mesh, [b_placement]).requires_grad_())
        hp = h.clone().requires_grad_()
        loss = fusedce.linear_cross_entropy(hp, wd, target, linear_bias=bd)
        grads = torch.autograd.grad(loss, [hp, wd, bd], distribute_tensor(
            up.to(loss.dtype), mesh, [Replicate()]))
        full = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]
        return max([_rel_err(loss.full_tensor().detach(), ref.detach())]
                   + [_rel_err(g, r) for g, r in zip(full, ref_grads)])

    # float64 in, float64 math out (a float32 path gave 1e-7)
    for name, placement in [("vocab", Shard(1)), ("batch", Shard(0))]:
        for reduction, upstream in [("mean", up), ("none", up_rows)]:
            opts = dict(weight=weight, label_smoothing=0.2, reduction=reduction)
            out[f"f64-{name}-{reduction}"] = versus_pytorch(
                logits, target, placement, upstream,
                lambda x, t, opts=opts: fusedce.cross_entropy(x, t, backend="torch", **opts),
                **opts)
    out["f64-linear-head"] = linear_errors(h, w, b, Shard(0))
    # with the loss extras (the CPU path's extras module), against fusedce on the full
    # float64 tensor (exact to float64 itself)
    extras = dict(logit_scale=0.5, softcap=20.0, lse_square_scale=1e-3, label_smoothing=0.2,
                  weight=weight)
    ref_x = logits.clone().requires_grad_()
    ref = fusedce.cross_entropy(ref_x, target, backend="torch", **extras)
    (ref_g,) = torch.autograd.grad(ref, ref_x, up)
    xd = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    got = fusedce.cross_entropy(xd, target, backend="torch", **extras)
    (got_g,) = torch.autograd.grad(got, xd, distribute_tensor(up, mesh, list(got.placements)))
    out["f64-vocab-extras"] = max(_rel_err(got.full_tensor().detach(), ref.detach()),
                                  _rel_err(got_g.full_tensor(), ref_g))

    # the bias of a Shard(0) head: Replicate() or plain (each rank takes its slice), or
    # Shard(0) as the head
    for name, placement in [("replicate", Replicate()), ("plain", None), ("shard", Shard(0))]:
        out[f"bias-{name}"] = _outcome(lambda p=placement: linear_errors(
            h.float(), w.float(), b.float(), p))
    out["bias-wrong-length"] = _outcome(lambda: fusedce.linear_cross_entropy(
        h.float(), distribute_tensor(w.float(), mesh, [Shard(0)]), target,
        linear_bias=torch.zeros(vocab - 1)))

    # fusedce.patched(): class probabilities on vocabulary-sharded logits go to PyTorch
    with fusedce.patched():
        out["patched-soft-vocab"] = _outcome(lambda: versus_pytorch(
            full32, soft.float(), Shard(1), up, lambda x, t: F.cross_entropy(
                x, distribute_tensor(t, mesh, [Replicate()]))))

    # return_aux on batch-sharded logits: every field as fusedce's on the full tensors, the
    # accuracy the batch's (a rank's alone differs: its rows' targets differ)
    aux_t = target.clone()
    aux_t[0] = logits[0].argmax()  # rank 0 right once, rank 1 and 2 otherwise
    for reduction, extra in [("none", {}), ("mean", {}), ("sum", {"lse_square_scale": 0.1})]:
        def aux_errors(reduction=reduction, extra=extra):
            ref = fusedce.cross_entropy(full32, aux_t, reduction=reduction, backend="torch",
                                        return_aux=True, **extra)
            x = distribute_tensor(full32, mesh, [Shard(0)])
            got = fusedce.cross_entropy(x, aux_t, reduction=reduction, backend="torch",
                                        return_aux=True, **extra)
            return max(_rel_err(getattr(got, k).full_tensor(), getattr(ref, k))
                       for k in ref._fields)
        out[f"aux-batch-{reduction}"] = _outcome(aux_errors)

    # bf16 batch-sharded 'mean' and 'sum': the exact loss rounded once to bf16 (within half
    # an ulp), not each rank's partial sum rounded before the all-reduce (up to 0.74 ulp)
    worst = 0.0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        x16 = (torch.randn(300, 50, generator=g) * 4).bfloat16()
        t16 = torch.randint(0, 50, (300,), generator=g)
        x = distribute_tensor(x16, mesh, [Shard(0)])
        for reduction in ("mean", "sum"):
            exact = F.cross_entropy(x16.double(), t16, reduction=reduction)
            got = fusedce.cross_entropy(x, t16, reduction=reduction, backend="torch")
            ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(exact.abs()))
            worst = max(worst, float((got.full_tensor().double() - exact).abs() / ulp))
    out["bf16-batch-ulps"] = worst

    # a second derivative (a gradient penalty) through the vocab-parallel loss: an error,
    # never a gradient without its penalty term; the first derivative still right
    def penalty(make_loss, leaf):
        loss = make_loss()
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        full_g = g.full_tensor() if hasattr(g, "full_tensor") else g
        local_loss = loss.to_local() if hasattr(loss, "to_local") else loss
        torch.autograd.grad(local_loss + (full_g ** 2).sum(), leaf)
        return "no error"

    x = distribute_tensor(full32, mesh, [Shard(1)]).requires_grad_()
    with fusedce.patched():
        out["double-backward-vocab"] = _outcome(lambda: penalty(
            lambda: F.cross_entropy(x, target), x))
        loss = F.cross_entropy(x, target)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    ref_x = logits.clone().requires_grad_()
    (ref_g,) = torch.autograd.grad(F.cross_entropy(ref_x, target), ref_x)
    out["create-graph-first-order"] = _rel_err(g.full_tensor().detach(), ref_g)
    hp = h.float().requires_grad_()
    wd = distribute_tensor(w.float(), mesh, [Shard(0)])
    out["double-backward-linear"] = _outcome(lambda: penalty(
        lambda: fusedce.linear_cross_entropy(hp, wd, target), hp))

    # class indices outside [0, C) with validate=True: IndexError on every rank, before any
    # collective (or riding on the one there is)
    bad = target.clone()
    bad[3] = vocab + 2  # a row of rank 1 under Shard(0)
    for name, placement in [("vocab", Shard(1)), ("batch", Shard(0))]:
        x = distribute_tensor(full32, mesh, [placement])
        out[f"validate-{name}"] = _outcome(lambda x=x: fusedce.cross_entropy(
            x, bad, validate=True).full_tensor())
    # targets of another length than the batch-sharded logits' rows: PyTorch's ValueError
    x = distribute_tensor(full32, mesh, [Shard(0)])
    out["batch-target-too-long"] = _outcome(lambda: fusedce.cross_entropy(
        x, torch.zeros(rows + 1, dtype=torch.long)))
    out["batch-target-too-short"] = _outcome(lambda: fusedce.cross_entropy(
        x, torch.zeros(rows - 1, dtype=torch.long)))
    out["validate-batch-sharded-target"] = _outcome(lambda: fusedce.cross_entropy(
        x, distribute_tensor(bad, mesh, [Shard(0)]), validate=True).full_tensor())
    # fusedce.distributed's plain-shard losses with a vocab_start that does not tile [0, C)
    # (slices 3, 2, 2 at 0, 3, 5): ValueError on every rank, where it merged a wrong loss
    import fusedce.distributed as D

    world = len(case.sizes)
    starts = [sum(case.sizes[:r]) for r in range(world)]
    cols = slice(starts[rank], starts[rank] + case.sizes[rank])
    shard = full32[:, cols]
    out["vocab-start-right"] = _rel_err(
        D.vocab_parallel_cross_entropy(shard, target, vocab_start=starts[rank]).double(),
        F.cross_entropy(logits, target))
    wrong = {"all-zero": 0, "shifted": starts[rank] + 1,
             "gap": starts[rank] + (rank == world - 1), "overlap": starts[rank] - (rank == 1),
             "beyond": 10 ** 6 if rank == 1 else starts[rank]}
    for name, start in wrong.items():
        out[f"vocab-start-{name}"] = _outcome(lambda start=start: float(
            D.vocab_parallel_cross_entropy(shard, target, vocab_start=start)))
    out["vocab-start-linear"] = _outcome(lambda: float(D.vocab_parallel_linear_cross_entropy(
        h.float(), w.float()[cols], target, vocab_start=starts[rank] + 1)))
    counter.take()
    return {"contract": out}


def _run_subgroups(case, rank, counter):
    """``case`` on the tensor-parallel group of ``rank``: ranks split in consecutive groups
    of ``len(case.sizes)``; each group gets its own data (its own seed)."""
    import torch.distributed as dist

    tp = len(case.sizes)
    groups = [dist.new_group(list(range(first, first + tp)))
              for first in range(0, dist.get_world_size(), tp)]  # every rank creates all
    index = rank // tp
    counter.take()
    own = dataclasses.replace(case, id=f"{case.id}/{index}", kind="ce")
    out = _run_ce(own, dist.get_rank(groups[index]), counter, group=groups[index])
    out["group"] = index
    return out


def _worker(rank, world, cases, init_file, out_dir):
    began = time.perf_counter()
    import torch.distributed as dist

    import fusedce.distributed  # noqa: F401  (imports Triton: TRITON_INTERPRET is set)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    nan_fill.install()  # fresh buffers start as NaN in the workers
    counter = CollectiveCounter()
    counter.install()
    runners = {"ce": _run_ce, "linear": _run_linear, "dtensor": _run_dtensor,
               "subgroups": _run_subgroups, "dtensor-ce": _run_dtensor_ce,
               "dtensor-errors": _run_dtensor_errors, "dtensor-linear": _run_dtensor_linear,
               "dtensor-contract": _run_dtensor_contract}
    results = {"_startup_seconds": time.perf_counter() - began}
    for case in cases:
        began = time.perf_counter()
        try:
            results[case.id] = runners[case.kind](case, rank, counter)
        except Exception:
            results[case.id] = {"error": traceback.format_exc()}
        results[case.id]["seconds"] = time.perf_counter() - began
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    helpers.leave_rank()


# ------------------------------------------------------------------------ in pytest


def _run_group(world, cases):
    """Spawns ``world`` workers over ``cases``; returns one results dict per rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_worker, args=(world, cases, init_file, tmp), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                pytest.fail(f"{world}-process group did not finish in {SPAWN_TIMEOUT_S} s")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def results_2():
    return _run_group(2, CASES_2)


@pytest.fixture(scope="module")
def results_4():
    return _run_group(4, CASES_4)


@pytest.fixture(scope="module")
def results_3():
    return _run_group(3, CASES_3)


def _check(case, per_rank):
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
    loss_rtol, grad_atol = TOLERANCES[case.dtype]
    if case.tol:
        loss_rtol = grad_atol = case.tol
    if case.loss_tol:
        loss_rtol = case.loss_tol
    first = {}
    for rank, res in enumerate(per_rank):
        # the ranks of a group merge the same gathered values the same way: bitwise equal
        loss, lead = res["loss"], first.setdefault(res.get("group", 0), res["loss"])
        assert torch.equal(torch.isnan(loss), torch.isnan(lead)), rank
        assert torch.equal(loss.nan_to_num(), lead.nan_to_num()), rank
    for rank, res in enumerate(per_rank):
        assert ("lse_err" in res) == dict(case.extras).get("return_aux", False), rank
        assert res["loss_err"] <= loss_rtol, (rank, res["loss_err"])
        assert res["grad_err"] <= grad_atol, (rank, res["grad_err"])
        for key in ("loss_err_vs_fused", "grad_err_vs_fused", "weight_grad_err",
                    "bias_grad_err", "input_grad_err", "z_loss_err", "lse_err",
                    "entropy_err", "accuracy_err", "front_loss_err", "input_grad_err_front"):
            if key in res:
                assert res[key] <= max(loss_rtol, grad_atol), (rank, key, res[key])


PLAIN_2 = [c for c in CASES_2 if not c.kind.startswith("dtensor")]


@pytest.mark.slow
@pytest.mark.parametrize("case", PLAIN_2, ids=_ids(PLAIN_2))
def test_two_ranks(case, results_2):
    per_rank = [res[case.id] for res in results_2]
    _check(case, per_rank)
    if case.threads > 1:  # the rows really went through the worker threads
        assert all(res["worker_threads"] == case.threads for res in per_rank)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES_4, ids=_ids(CASES_4))
def test_four_ranks(case, results_4):
    per_rank = [res[case.id] for res in results_4]
    _check(case, per_rank)
    if case.kind == "dtensor":
        assert all(res["local_shape_ok"] for res in per_rank)


DTENSOR_CE_CASES = [c for c in CASES_3 if c.kind == "dtensor-ce"]
DTENSOR_LINEAR_CASES = [c for c in CASES_3 if c.kind == "dtensor-linear"]
DTENSOR_2 = [c for c in CASES_2 if c.kind.startswith("dtensor")]


@pytest.mark.slow
@pytest.mark.parametrize("case", DTENSOR_2, ids=_ids(DTENSOR_2))
def test_dtensor_two_ranks(case, results_2):
    per_rank = [res[case.id] for res in results_2]
    if case.kind == "dtensor-ce":
        _check_dtensor_ce(case, per_rank)
    else:
        _check_dtensor_linear(case, per_rank)


@pytest.mark.slow
@pytest.mark.parametrize("case", DTENSOR_LINEAR_CASES, ids=_ids(DTENSOR_LINEAR_CASES))
def test_dtensor_head_three_ranks(case, results_3):
    """linear_cross_entropy with a vocabulary-sharded DTensor head: PyTorch's loss and
    gradients (input, weight, bias), the weight's gradient a Shard(0) DTensor."""
    _check_dtensor_linear(case, [res[case.id] for res in results_3])


def _check_dtensor_linear(case, per_rank):
    """Collectives: one all-gather in the forward; in the backward one all-reduce of the
    input's gradient, by fusedce for a plain input, by DTensor (its Partial gradient summed)
    for a Replicate() one."""
    _check(case, per_rank)
    gather = ("all_gather_single" if hasattr(torch.distributed, "all_gather_single")
              else "all_gather_into_tensor")
    for res in per_rank:
        assert res["grad_placements_ok"]
        assert res["fwd_calls"] == [gather] and res["comm_counts"][0] == 1, res
        assert res["bwd_calls"] == ([] if case.dtensor_target else ["all_reduce"]), res
        assert res["comm_counts"][1] == 1, res


@pytest.mark.slow
def test_dtensor_unsupported_layouts_raise(results_3):
    """Partial logits, a mesh of two dimensions, logits sharded on neither the batch nor the
    class dimension, and a z-loss on a batch-sharded mean: NotImplementedError, saying why;
    under fusedce.patched(), F.cross_entropy leaves such logits to PyTorch's own loss."""
    for res in results_3:
        errors = res["dt-errors"]["errors"]
        assert errors["partial"].startswith("NotImplementedError") and "Partial" in \
            errors["partial"], errors
        assert errors["mesh-2d"].startswith("NotImplementedError") and "1-d device mesh" in \
            errors["mesh-2d"], errors
        assert errors["shard-2"].startswith("NotImplementedError") and "(N, C)" in \
            errors["shard-2"], errors
        assert errors["z-loss-batch-mean"].startswith("NotImplementedError"), errors
        assert errors["patched-mesh-2d-err"] < 1e-6, errors


def _contract(results_3):
    """Rank by rank, the checks of ``_run_dtensor_contract``."""
    per_rank = [res["dt-contract"] for res in results_3]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
    return [res["contract"] for res in per_rank]


@pytest.mark.slow
def test_dtensor_float64_is_computed_in_float64(results_3):
    """float64 DTensor logits (vocabulary- and batch-sharded, weights and smoothing, 'mean'
    and 'none'; vocabulary-sharded with the loss extras) and a float64 sharded head: float64
    results, as fusedce's on plain tensors (they were computed in float32: errors of 1e-7,
    3e-10 with the extras)."""
    for res in _contract(results_3):
        for key in ("f64-vocab-mean", "f64-vocab-none", "f64-batch-mean", "f64-batch-none",
                    "f64-linear-head", "f64-vocab-extras"):
            assert res[key] < 1e-12, (key, res[key])


@pytest.mark.slow
def test_dtensor_head_bias_placements(results_3):
    """A Shard(0) head's bias as a Replicate() DTensor or a plain full tensor (each rank takes
    its slice; the gradient summed) or Shard(0): PyTorch's loss and gradients; a bias of
    another length raises saying so."""
    for res in _contract(results_3):
        for key in ("bias-replicate", "bias-plain", "bias-shard"):
            assert isinstance(res[key], float) and res[key] < 2e-5, (key, res[key])
        assert res["bias-wrong-length"].startswith("RuntimeError") and \
            "linear_bias" in res["bias-wrong-length"], res["bias-wrong-length"]


@pytest.mark.slow
def test_patched_leaves_soft_targets_of_vocab_sharded_logits_to_pytorch(results_3):
    """Under fusedce.patched(), F.cross_entropy of Shard(1) logits with class-probability
    targets (which fusedce's vocab-parallel loss does not take) is PyTorch's."""
    for res in _contract(results_3):
        value = res["patched-soft-vocab"]
        assert isinstance(value, float) and value < 2e-5, value


@pytest.mark.slow
def test_dtensor_batch_sharded_aux_outputs(results_3):
    """return_aux with Shard(0) logits, every reduction: each field (loss, z_loss, lse,
    accuracy, entropy) that of fusedce.cross_entropy on the full tensors; the accuracy over
    the whole batch."""
    for res in _contract(results_3):
        for key in ("aux-batch-none", "aux-batch-mean", "aux-batch-sum"):
            assert isinstance(res[key], float) and res[key] < 2e-5, (key, res[key])


@pytest.mark.slow
def test_dtensor_batch_sharded_bf16_rounds_once(results_3):
    """bf16 Shard(0) logits, 'mean' and 'sum': the ranks' partial sums are all-reduced in
    fp32 and the result rounded once, within half a bf16 ulp of the exact loss."""
    for res in _contract(results_3):
        assert res["bf16-batch-ulps"] <= 0.5 + 1e-3, res["bf16-batch-ulps"]


@pytest.mark.slow
def test_dtensor_vocab_parallel_second_derivative_raises(results_3):
    """create_graph=True through the vocab-parallel loss (Shard(1) logits under
    fusedce.patched(), a Shard(0) head): differentiating the gradient again raises, naming
    the limitation (the penalty term silently dropped out before); the first derivative is
    still right."""
    for res in _contract(results_3):
        for key in ("double-backward-vocab", "double-backward-linear"):
            assert res[key].startswith("RuntimeError") and "no second derivative" in \
                res[key], (key, res[key])
        assert res["create-graph-first-order"] < 2e-5, res["create-graph-first-order"]


@pytest.mark.slow
def test_vocab_start_that_does_not_tile_raises_on_every_rank(results_3):
    """A vocab_start that leaves the ranks' slices overlapping, apart or shifted merged
    into a wrong loss with no error (found in review); every rank now raises ValueError
    (the starts ride on the forward's all-gather), and the right starts give PyTorch's
    loss."""
    for res in _contract(results_3):
        assert res["vocab-start-right"] < 1e-6, res["vocab-start-right"]
        for key in ("all-zero", "shifted", "gap", "overlap", "beyond", "linear"):
            got = res[f"vocab-start-{key}"]
            assert isinstance(got, str) and got.startswith(
                "ValueError: vocab_start: the ranks' slices do not tile"), (key, got)


@pytest.mark.slow
def test_dtensor_targets_checked_on_every_rank(results_3):
    """validate=True raises PyTorch's IndexError on every rank (vocabulary-sharded logits
    gave NaN); targets of another length than the batch-sharded logits raise PyTorch's
    ValueError on every rank (too many were taken; too few left ranks in the all-reduce)."""
    for res in _contract(results_3):
        for key in ("validate-vocab", "validate-batch", "validate-batch-sharded-target"):
            assert res[key].startswith("IndexError: Target"), (key, res[key])
        for key, n in [("batch-target-too-long", 7), ("batch-target-too-short", 5)]:
            assert res[key] == (f"ValueError: Expected input batch_size (6) to match target "
                                f"batch_size ({n})."), (key, res[key])


@pytest.mark.slow
@pytest.mark.parametrize("case", DTENSOR_CE_CASES, ids=_ids(DTENSOR_CE_CASES))
def test_dtensor_logits_three_ranks(case, results_3):
    """fusedce.cross_entropy on DTensor logits: PyTorch's loss on the full logits, the
    gradient a DTensor with the logits' placements; collectives: vocabulary-sharded, one
    all-gather in the forward; batch-sharded 'mean'/'sum', one all-reduce; none in any
    backward."""
    _check_dtensor_ce(case, [res[case.id] for res in results_3])


def _check_dtensor_ce(case, per_rank):
    _check(case, per_rank)
    gather = ("all_gather_single" if hasattr(torch.distributed, "all_gather_single")
              else "all_gather_into_tensor")
    for res in per_rank:
        assert res["grad_placements_ok"]
        assert res["bwd_calls"] == [] and res["comm_counts"][1] == 0, res["bwd_calls"]
        if case.placement == "vocab":
            assert res["fwd_calls"] == [gather] and res["comm_counts"][0] == 1, res
            assert res["loss_placements"] == "(Replicate(),)"
        elif case.placement == "batch" and case.reduction != "none":
            assert res["fwd_calls"] == [] and res["comm_counts"][0] == 1, res
            assert res["loss_placements"] == "(Replicate(),)"
            # README: "plus one all-reduce of 2 numbers" (the sum and, for 'mean', the count)
            numbers = 2 if case.reduction == "mean" else 1
            if case.dtensor_target and case.backend == "torch":
                # validated by default on the CPU path: each rank checks its own targets,
                # and the count of bad ones rides on the all-reduce (so no rank is left
                # waiting in it while another raises)
                numbers += 1
            assert res["fwd_functional_sent"] == [("all_reduce", numbers, "torch.float32")], \
                res["fwd_functional_sent"]
        else:
            assert res["fwd_calls"] == [] and res["comm_counts"][0] == 0, res


def _calls(results, case_id):
    return [(res[case_id]["fwd_calls"], res[case_id]["bwd_calls"]) for res in results]


@pytest.mark.slow
def test_vocab_shard_range(results_2, results_4):
    """vocab_shard_range(C_r, group) -> (vocab_start, C) on every rank, uneven slices."""
    for results, case in [(results_2, CASES_2), (results_4, CASES_4)]:
        checked = [c for c in case if not c.pass_vocab_start and c.kind == "ce"]
        assert checked
        for c in checked:
            expect = [(sum(c.sizes[:r]), c.vocab) for r in range(len(c.sizes))]
            assert [res[c.id]["shard_range"] for res in results] == expect, c.id


@pytest.mark.slow
def test_collectives_per_step(results_2, results_4):
    """One all-gather per forward and nothing in the backward; a second all-gather when
    vocab_start must be derived; the linear form adds one all-reduce in the backward."""
    gather = ["all_gather_single" if hasattr(torch.distributed, "all_gather_single")
              else "all_gather_into_tensor"]
    for results, case_id in [(results_2, "mean"), (results_2, "weight-smoothing-none"),
                             (results_2, "triton-plain"), (results_4, "gpt2-vocab-mean")]:
        assert _calls(results, case_id) == [(gather, [])] * len(results), case_id
    for results, case_id in [(results_2, "derive-vocab-start"),
                             (results_4, "gpt2-vocab-sum-derive-start")]:
        assert _calls(results, case_id) == [(gather * 2, [])] * len(results), case_id
    for results, case_id in [(results_2, "linear-mean"), (results_4, "linear-gpt2-vocab")]:
        assert _calls(results, case_id) == [(gather, ["all_reduce"])] * len(results), case_id


def test_what_the_forward_all_gather_sends(results_2, results_4):
    """README: the forward's one all-gather sends 2N + 3 float64 values per rank (3N + 3
    with label smoothing), N the rows, whatever the logits' dtype."""
    for results, case_id, per_row in [(results_2, "mean", 2), (results_4, "gpt2-vocab-mean", 2),
                                      (results_2, "weight-smoothing-none", 3),
                                      (results_2, "triton-bf16", 3)]:
        case = next(c for c in CASES_2 + CASES_4 if c.id == case_id)
        assert (case.label_smoothing > 0) == (per_row == 3), case_id
        for rank in results:
            (name, elements, dtype), = rank[case_id]["fwd_sent"]
            assert name.startswith("all_gather"), (case_id, name)
            assert (elements, dtype) == (per_row * case.rows + 3, "torch.float64"), case_id


GPU_CHECK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "bench", "gpu_check_distributed.py")


@pytest.mark.slow
def test_gpu_check_script_skips_clearly_without_gpus():
    if torch.cuda.device_count() > 1:
        pytest.skip("this machine has GPUs for the real run")
    run = subprocess.run([sys.executable, GPU_CHECK], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("SKIP: the NCCL check needs at least 2 GPUs"), run.stdout


@pytest.mark.slow
def test_gpu_check_script_on_cpu_processes(tmp_path):
    """The NCCL script's every step, on 2 gloo processes with tiny shapes: checks pass,
    the collectives are as documented, the CSV holds the figures."""
    csv_path = tmp_path / "vp.csv"
    run = subprocess.run([sys.executable, GPU_CHECK, "--gloo", "2", "--rows", "4",
                          "--time-rows", "8", "--repeats", "1", "--hidden", "16",
                          "--csv", str(csv_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.rstrip().endswith("PASS"), run.stdout[-3000:]
    assert "FAIL" not in run.stdout
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert sum(r["kind"] == "check" and r["ok"] == "True" for r in rows) == 6
    (timing,) = [r for r in rows if r["kind"] == "timing"]
    assert float(timing["comm_1_all_gather_ms"]) > 0


def test_even_vocab_shard_matches_torch_chunk():
    from fusedce.distributed import even_vocab_shard

    for vocab, world in [(GPT2_VOCAB, 4), (GPT2_VOCAB, 8), (5, 4), (3, 4), (12, 4)]:
        chunks = torch.arange(vocab).chunk(world)
        for rank in range(world):
            start, n = even_vocab_shard(vocab, rank, world)
            expect = chunks[rank] if rank < len(chunks) else torch.arange(0)
            assert n == expect.numel(), (vocab, world, rank)
            if n:
                assert start == int(expect[0]), (vocab, world, rank)


@pytest.mark.parametrize("args", [(10, 4, 4), (10, -1, 4), (GPT2_VOCAB, 4, 2), (10, 0, 0),
                                  (-1, 0, 2)])
def test_even_vocab_shard_refuses_a_rank_outside_the_world(args):
    """rank == world (or swapped with it) gave an empty slice at the end, a negative rank a
    negative start, and no rank at all ZeroDivisionError: each a ValueError naming them."""
    from fusedce.distributed import even_vocab_shard

    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        even_vocab_shard(*args)


def test_needs_a_process_group():
    from fusedce.distributed import vocab_parallel_cross_entropy

    if torch.distributed.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="process group"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), vocab_start=0)


def _table():
    """Per case: the worst errors over the ranks and the collectives of rank 0."""
    lines = []
    for world, cases in [(2, CASES_2), (4, CASES_4)]:
        began = time.perf_counter()
        results = _run_group(world, cases)
        lines.append(f"{world} ranks (gloo, CPU), {time.perf_counter() - began:.1f} s:")
        for case in cases:
            per_rank = [res[case.id] for res in results]
            if any("error" in res for res in per_rank):
                lines.append(f"  {case.id:36s} ERROR")
                continue
            errs = {k: max(res[k] for res in per_rank) for k in per_rank[0]
                    if k.endswith("_err") or k.endswith("_fused")}
            calls = per_rank[0].get("fwd_calls"), per_rank[0].get("bwd_calls")
            lines.append(f"  {case.id:36s} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                         + (f"  fwd={calls[0]} bwd={calls[1]}" if calls[0] is not None else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table())


INFERENCE_SCRIPT = r"""
import sys, torch, torch.distributed as dist
import torch.nn.functional as F
import fusedce.distributed as D
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
x = torch.randn(4, 7, requires_grad=True)
h = torch.randn(4, 5, requires_grad=True)
w = torch.randn(7, 5, requires_grad=True)
t = torch.tensor([0, 1, 2, 3])
with torch.inference_mode(), torch.enable_grad():
    a = D.vocab_parallel_cross_entropy(x, t, vocab_start=0, backend="torch")
    b = D.vocab_parallel_linear_cross_entropy(h, w, t, vocab_start=0, backend="torch")
    ra, rb = F.cross_entropy(x, t), F.cross_entropy(F.linear(h, w), t)
assert not a.requires_grad and not b.requires_grad, (a, b)
torch.testing.assert_close(a, ra, atol=1e-6, rtol=1e-6)
torch.testing.assert_close(b, rb, atol=1e-6, rtol=1e-6)
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.slow
def test_inference_mode_with_grad_enabled(tmp_path):
    """``torch.enable_grad()`` inside ``torch.inference_mode()``: no graph, as PyTorch's
    ops (both vocab-parallel losses raised "Inference tensors cannot be saved for
    backward"). One rank of gloo in a subprocess."""
    out = subprocess.run([sys.executable, "-c", INFERENCE_SCRIPT, str(tmp_path / "rdzv")],
                         capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


WEIGHT_LENGTH_SCRIPT = r"""
import sys, torch, torch.distributed as dist
import torch.nn.functional as F
import fusedce.distributed as D
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
x, t, w = torch.randn(4, 7), torch.tensor([0, 1, 2, 3]), torch.ones(8)
try:
    F.cross_entropy(x, t, weight=w)
except Exception as e:
    expected = type(e)
for fn in (lambda: D.vocab_parallel_cross_entropy(x, t, weight=w, vocab_start=0),
           lambda: D.vocab_parallel_linear_cross_entropy(torch.randn(4, 5), torch.randn(7, 5),
                                                         t, weight=w, vocab_start=0)):
    try:
        fn()
        raise SystemExit("no error")
    except expected as e:
        assert "weight tensor should be defined" in str(e), e
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.slow
def test_weight_of_the_wrong_length_raises_pytorchs_error(tmp_path):
    """The class count is known after the forward's collective; a weight vector of another
    length raises then, with the exception type F.cross_entropy raises. One rank of gloo."""
    out = subprocess.run([sys.executable, "-c", WEIGHT_LENGTH_SCRIPT, str(tmp_path / "rdzv")],
                         capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_losses_never_import_the_distributed_engine():
    """``import fusedce`` and losses on plain tensors and parameters import nothing of
    torch.distributed.tensor (the DTensor check reads sys.modules) and initialise no
    process group."""
    code = ("import sys, torch, fusedce\n"
            "p = torch.nn.Parameter(torch.randn(4, 5))\n"
            "fusedce.cross_entropy(p, torch.tensor([0, 1, 2, 3]), backend='torch').backward()\n"
            "fusedce.linear_cross_entropy(torch.randn(2, 3), p[:, :3], torch.tensor([0, 1]))\n"
            "print('torch.distributed.tensor' in sys.modules,\n"
            "      torch.distributed.is_available() and torch.distributed.is_initialized())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]
