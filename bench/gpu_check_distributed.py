"""Check of fusedce.distributed over NCCL: one process per GPU, machines with more than one.

    python bench/gpu_check_distributed.py             # NCCL, one process per GPU (at most 8)
    python bench/gpu_check_distributed.py --gloo 4    # the same run on 4 CPU processes (gloo)

With fewer than two GPUs (and no ``--gloo``) it prints a SKIP line and exits with status 0:
nothing was checked. Otherwise each rank builds the same full logits from a seed, takes its
slice of the vocabulary (the GPT-2 vocabulary, 50,257, split as DTensor splits it, uneven
for 4 ranks), and compares the vocab-parallel loss and slice gradient with
``fusedce.cross_entropy`` on the full logits (same dtype) and ``F.cross_entropy`` in
float64; the same for the vocab-parallel linear form against ``F.linear`` +
``F.cross_entropy`` in float64. It counts the collectives of each forward and backward, and
times (medians) the forward + backward of a slice against the single-device loss on the full
logits, and the one all-gather of the forward against the three all-reduces Megatron-LM
issues (max, sum of exponentials, target logit; ``_megatron_style_forward`` below, forward
only). Exit status 1 when a check fails. ``--csv PATH`` writes the figures.
"""

import argparse
import csv
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

GPT2_VOCAB = 50_257
# (dtype, loss rtol, grad tolerance relative to the largest reference gradient)
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}


def _rel_err(a, b):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / scale)


class _Counter:
    """Counts the outermost torch.distributed collective calls (patched module functions)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
             "reduce_scatter_tensor", "broadcast", "all_to_all_single", "barrier")

    def __init__(self):
        self.calls, self.depth = [], 0
        for name in self.NAMES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.depth == 0:
                self.calls.append(name)
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _megatron_style_forward(x_shard, target, vocab_start):
    """The baseline's communication: three all-reduces (max, sum of exp, target logit)."""
    x = x_shard.float()
    m = x.max(dim=1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    sum_exp = torch.exp(x - m[:, None]).sum(1)
    dist.all_reduce(sum_exp)
    t_local = target - vocab_start
    inside = (t_local >= 0) & (t_local < x.shape[1])
    x_t = torch.where(inside, x.gather(1, t_local.clamp(0, x.shape[1] - 1)[:, None])[:, 0], 0.0)
    dist.all_reduce(x_t)
    return (m + sum_exp.log() - x_t).mean()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync(device)
        began = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def _check_ce(rank, world, device, counter, rows, dtype, smoothing, weighted, reduction,
              shift=0.0):
    import fusedce
    from fusedce.distributed import even_vocab_shard, vocab_parallel_cross_entropy

    gen = torch.Generator(device=device).manual_seed(1234 + rows)
    logits = (torch.randn(rows, GPT2_VOCAB, generator=gen, device=device) * 3
              + shift).to(dtype)
    target = torch.randint(0, GPT2_VOCAB, (rows,), generator=gen, device=device)
    target[::7] = -100
    weight = (torch.rand(GPT2_VOCAB, generator=gen, device=device) + 0.5) if weighted else None
    upstream = torch.randn((rows,) if reduction == "none" else (), generator=gen,
                           device=device)
    opts = dict(reduction=reduction, label_smoothing=smoothing)
    start, n_local = even_vocab_shard(GPT2_VOCAB, rank, world)
    cols = slice(start, start + n_local)

    full64 = logits.double().requires_grad_()
    ref = F.cross_entropy(full64, target, weight=None if weight is None else weight.double(),
                          **opts)
    (ref_grad,) = torch.autograd.grad(ref, full64, upstream.double())
    full = logits.clone().requires_grad_()
    fused = fusedce.cross_entropy(full, target, weight=weight, **opts)
    (fused_grad,) = torch.autograd.grad(fused, full, upstream.to(dtype))

    shard = logits[:, cols].clone().requires_grad_()
    counter.take()
    loss = vocab_parallel_cross_entropy(shard, target, vocab_start=start, weight=weight,
                                        **opts)
    fwd = counter.take()
    (grad,) = torch.autograd.grad(loss, shard, upstream.to(dtype))
    bwd = counter.take()
    same = torch.empty(world * loss.numel(), dtype=loss.dtype, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(same, loss.detach().reshape(-1).contiguous())
    counter.take()
    return {
        "check": f"ce {str(dtype)[6:]} rows={rows} eps={smoothing} weight={weighted} "
                 f"{reduction}" + (f" logits~{shift:g}" if shift else ""),
        "loss_err_vs_f64": _rel_err(loss.detach(), ref.detach()),
        "loss_err_vs_fused": _rel_err(loss.detach(), fused.detach()),
        "grad_err_vs_f64": _rel_err(grad, ref_grad[:, cols]),
        "grad_err_vs_fused": _rel_err(grad, fused_grad[:, cols]),
        "ranks_agree": bool(torch.equal(same.view(world, -1), loss.detach().reshape(1, -1)
                                        .expand(world, -1))),
        "fwd_collectives": ",".join(fwd) or "-",
        "bwd_collectives": ",".join(bwd) or "-",
        "tol": TOLERANCES[dtype],
    }


def _check_linear(rank, world, device, counter, rows, hidden, dtype):
    from fusedce.distributed import even_vocab_shard, vocab_parallel_linear_cross_entropy

    gen = torch.Generator(device=device).manual_seed(99)
    h = torch.randn(rows, hidden, generator=gen, device=device)
    w = torch.randn(GPT2_VOCAB, hidden, generator=gen, device=device) / hidden**0.5
    target = torch.randint(0, GPT2_VOCAB, (rows,), generator=gen, device=device)
    upstream = torch.randn((), generator=gen, device=device)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, w64), target, label_smoothing=0.1)
    ref_dh, ref_dw = torch.autograd.grad(ref, (h64, w64), upstream.double())
    start, n_local = even_vocab_shard(GPT2_VOCAB, rank, world)
    cols = slice(start, start + n_local)
    mine_h = h.to(dtype).requires_grad_()
    mine_w = w[cols].to(dtype).requires_grad_()
    counter.take()
    loss = vocab_parallel_linear_cross_entropy(mine_h, mine_w, target, vocab_start=start,
                                               label_smoothing=0.1)
    fwd = counter.take()
    dh, dw = torch.autograd.grad(loss, (mine_h, mine_w), upstream.to(dtype))
    bwd = counter.take()
    return {
        "check": f"linear {str(dtype)[6:]} rows={rows} hidden={hidden} eps=0.1 mean",
        "loss_err_vs_f64": _rel_err(loss.detach(), ref.detach()),
        "grad_err_vs_f64": max(_rel_err(dh, ref_dh), _rel_err(dw, ref_dw[cols])),
        "fwd_collectives": ",".join(fwd) or "-",
        "bwd_collectives": ",".join(bwd) or "-",
        "tol": TOLERANCES[dtype],
    }


def _timings(rank, world, device, rows, dtype, repeats, hidden):
    import fusedce
    from fusedce.distributed import even_vocab_shard, vocab_parallel_cross_entropy

    gen = torch.Generator(device=device).manual_seed(7)
    start, n_local = even_vocab_shard(GPT2_VOCAB, rank, world)
    shard = (torch.randn(rows, n_local, generator=gen, device=device) * 3).to(dtype)
    shard.requires_grad_()
    target = torch.randint(0, GPT2_VOCAB, (rows,), generator=gen, device=device)

    def vp_step():
        vocab_parallel_cross_entropy(shard, target, vocab_start=start).backward()

    def vp_forward():
        with torch.no_grad():
            vocab_parallel_cross_entropy(shard, target, vocab_start=start)

    def megatron_forward():
        with torch.no_grad():
            _megatron_style_forward(shard, target, start)

    # the communication alone: what each forward sends and receives
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    send = torch.randn(2 * rows + 1, device=device)
    recv = torch.empty(world * send.numel(), device=device)
    per_row = [torch.randn(rows, device=device) for _ in range(3)]

    def one_all_gather():
        gather(recv, send)

    def three_all_reduces():
        for i, buf in enumerate(per_row):
            dist.all_reduce(buf, op=dist.ReduceOp.MAX if i == 0 else dist.ReduceOp.SUM)

    out = {
        "comm_1_all_gather_ms": _median_ms(one_all_gather, device, repeats),
        "comm_3_all_reduces_ms": _median_ms(three_all_reduces, device, repeats),
        "vp_fwd_bwd_ms": _median_ms(vp_step, device, repeats),
        "vp_fwd_ms": _median_ms(vp_forward, device, repeats),
        "megatron3_fwd_ms": _median_ms(megatron_forward, device, repeats),
    }
    # the same slice through the single-device loss, as if it were the whole vocabulary:
    # what being distributed costs on top (merge, all-gather)
    alone = shard.detach().clone().requires_grad_()
    t_alone = target % n_local
    out["fused_same_slice_fwd_bwd_ms"] = _median_ms(
        lambda: fusedce.cross_entropy(alone, t_alone).backward(), device, repeats)
    full = (torch.randn(rows, GPT2_VOCAB, generator=gen, device=device) * 3).to(dtype)
    full.requires_grad_()
    out["single_device_full_fwd_bwd_ms"] = _median_ms(
        lambda: fusedce.cross_entropy(full, target).backward(), device, repeats)
    out.update(_linear_timings(rank, world, device, rows, dtype, repeats, target, hidden))
    return out


def _linear_timings(rank, world, device, rows, dtype, repeats, target, hidden):
    """The linear form against F.linear + vocab_parallel_cross_entropy (+ the all-reduce of
    the hidden states' gradient), time and, on a GPU, peak memory above the inputs."""
    from fusedce.distributed import (
        even_vocab_shard,
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    gen = torch.Generator(device=device).manual_seed(8)
    start, n_local = even_vocab_shard(GPT2_VOCAB, rank, world)
    h = torch.randn(rows, hidden, generator=gen, device=device).to(dtype).requires_grad_()
    w = (torch.randn(n_local, hidden, generator=gen, device=device) / hidden**0.5).to(dtype)
    w.requires_grad_()

    def fused():
        h.grad = w.grad = None
        vocab_parallel_linear_cross_entropy(h, w, target, vocab_start=start).backward()

    def unfused():
        h.grad = w.grad = None
        loss = vocab_parallel_cross_entropy(F.linear(h, w), target, vocab_start=start)
        loss.backward()
        dist.all_reduce(h.grad)

    out = {"vp_linear_fwd_bwd_ms": _median_ms(fused, device, repeats),
           "vp_unfused_linear_fwd_bwd_ms": _median_ms(unfused, device, repeats)}
    if device.type == "cuda":
        for name, step in (("vp_linear", fused), ("vp_unfused_linear", unfused)):
            h.grad = w.grad = None
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            out[f"{name}_peak_extra_mib"] = (torch.cuda.max_memory_allocated(device)
                                             - base) / 2**20
    return out


def _worker(rank, world, backend, init_file, args):
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    counter = _Counter()
    checks = []
    dtypes = [torch.float32, torch.bfloat16]
    rows = args.rows
    for dtype in dtypes:
        checks.append(_check_ce(rank, world, device, counter, rows, dtype, 0.0, False, "mean"))
        checks.append(_check_ce(rank, world, device, counter, rows, dtype, 0.1, True, "none"))
    # rows far from 0: each shard's lse sent and merged in float64 (fp32 lost 1e-4 at 1e4)
    checks.append(_check_ce(rank, world, device, counter, rows, torch.float32, 0.1, True,
                            "none", shift=1e4))
    checks.append(_check_linear(rank, world, device, counter, rows, args.hidden,
                                torch.float32))
    times = _timings(rank, world, device, args.time_rows, torch.bfloat16 if backend == "nccl"
                     else torch.float32, args.repeats, args.hidden)
    gathered = [None] * world
    dist.all_gather_object(gathered, (checks, times))
    if rank == 0:
        failed = _report(gathered, world, backend, device, args)
        with open(os.path.join(os.path.dirname(init_file), "failed"), "w") as f:
            f.write(str(failed))
    dist.destroy_process_group()


def _report(gathered, world, backend, device, args):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"fusedce.distributed on {world} x {name} ({backend}), vocab {GPT2_VOCAB}, "
          f"torch {torch.__version__}")
    failed = 0
    rows = []
    for i, check in enumerate(gathered[0][0]):
        per_rank = [g[0][i] for g in gathered]
        loss_tol, grad_tol = check["tol"]
        worst = {k: max(c[k] for c in per_rank) for k in check
                 if k.startswith(("loss_err", "grad_err"))}
        ok = all(v <= (loss_tol if k.startswith("loss") else grad_tol) for k, v in worst.items())
        ok = ok and all(c.get("ranks_agree", True) for c in per_rank)
        expect_bwd = "all_reduce" if check["check"].startswith("linear") else "-"
        ok = ok and all(c["fwd_collectives"] in ("all_gather_single", "all_gather_into_tensor")
                        and c["bwd_collectives"] == expect_bwd for c in per_rank)
        failed += not ok
        figures = " ".join(f"{k}={v:.1e}" for k, v in worst.items())
        print(f"  {'ok  ' if ok else 'FAIL'} {check['check']:48s} {figures} "
              f"fwd:{check['fwd_collectives']} bwd:{check['bwd_collectives']}")
        rows.append({"kind": "check", "name": check["check"], "ok": ok, **worst})
    times = {k: statistics.median(g[1][k] for g in gathered) for k in gathered[0][1]}
    dtype = "bf16" if backend == "nccl" else "fp32"
    print(f"  timings, {args.time_rows} rows, {dtype}, median of {args.repeats} "
          f"(median over ranks):")
    for key, value in times.items():
        print(f"    {key:32s} {value:9.3f} ms")
    print(f"    communication, 1 all-gather vs Megatron's 3 all-reduces: "
          f"{times['comm_1_all_gather_ms'] / times['comm_3_all_reduces_ms']:.2f}x the time")
    print(f"    forward, fused slice + 1 all-gather vs unfused + 3 all-reduces: "
          f"{times['vp_fwd_ms'] / times['megatron3_fwd_ms']:.2f}x the time")
    print(f"    fwd+bwd of a 1/{world} slice vs the full logits on one device: "
          f"{times['vp_fwd_bwd_ms'] / times['single_device_full_fwd_bwd_ms']:.2f}x the time")
    print(f"    fwd+bwd of a slice vs fusedce.cross_entropy on the same slice alone: "
          f"{times['vp_fwd_bwd_ms'] / times['fused_same_slice_fwd_bwd_ms']:.2f}x the time")
    print(f"    linear form vs F.linear + vocab_parallel_cross_entropy: "
          f"{times['vp_linear_fwd_bwd_ms'] / times['vp_unfused_linear_fwd_bwd_ms']:.2f}x "
          f"the time")
    rows.append({"kind": "timing", "name": f"{world}x{name} {backend} {dtype} "
                 f"rows={args.time_rows}", **times})
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    print("PASS" if not failed else f"FAIL: {failed} check(s)")
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gloo", type=int, default=0, metavar="N",
                        help="run on N CPU processes with gloo instead of the GPUs")
    parser.add_argument("--rows", type=int, default=64, help="rows of the checks")
    parser.add_argument("--time-rows", type=int, default=0,
                        help="rows of the timings (default 8192 on GPUs, 256 with --gloo)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed repeats (default 20 on GPUs, 9 with --gloo)")
    parser.add_argument("--hidden", type=int, default=768,
                        help="hidden size of the linear form (default 768, GPT-2 small)")
    parser.add_argument("--csv", default="", help="write the figures to this CSV file")
    args = parser.parse_args()
    if args.gloo:
        backend, world = "gloo", args.gloo
        os.environ.setdefault("TRITON_INTERPRET", "1")  # not used: the CPU path runs PyTorch
    else:
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus < 2:
            print(f"SKIP: the NCCL check needs at least 2 GPUs, this machine has {n_gpus} "
                  "(nothing was checked; --gloo N runs it on CPU processes)")
            return 0
        if not dist.is_nccl_available():
            print("SKIP: this PyTorch build has no NCCL")
            return 0
        backend, world = "nccl", min(n_gpus, 8)
    args.time_rows = args.time_rows or (8192 if backend == "nccl" else 256)
    args.repeats = args.repeats or (20 if backend == "nccl" else 9)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, backend, os.path.join(tmp, "rdv"), args),
                           nprocs=world, start_method="spawn")
        with open(os.path.join(tmp, "failed")) as f:
            return 1 if int(f.read()) else 0


if __name__ == "__main__":
    sys.exit(main())
