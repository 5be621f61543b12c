"""``python -m bench.grid``: fusedce against ``F.cross_entropy`` over a grid of small and large
calls, as ratios of medians taken in the same process.

A drop-in is judged on every call a program makes (``fusedce.patched()`` routes them all):
batches of one, 10-class classifiers, 2-class reward heads, and the large language-model
loss. For each mode, dtype, row count N and class count C it times fusedce's
``cross_entropy`` and PyTorch's, interleaved (one sample of each in turn), each sample a loop
of calls long enough to time, and prints the grid of ratios fusedce / PyTorch (below 1:
fusedce is faster) and writes every cell to ``grid_<device>.csv`` in ``--out``.

Modes: ``fwdbwd`` (forward + backward, reduction 'mean'), ``nograd`` (the forward alone
under ``torch.no_grad``), ``none`` (reduction 'none', forward + backward of its sum).

    python -m bench.grid                                  # the whole grid, fp32 and bf16
    python -m bench.grid --modes fwdbwd --dtypes fp32 --rows 1,64 --classes 10,50257
    python -m bench.grid --own                            # fusedce's own path everywhere
"""

import argparse
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fusedce
from bench.output import add_out_argument, device, parse_checked

MODES = ("fwdbwd", "nograd", "none")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS = "1,6,64,512,4096"
CLASSES = "2,10,32,1000,50257"


def make_call(fn, x, target, mode):
    """A closure running one call of ``fn`` in ``mode`` on ``x`` / ``target``."""
    if mode == "nograd":
        def call():
            with torch.no_grad():
                fn(x, target)
        return call
    leaf = x.detach().requires_grad_()
    reduction = "none" if mode == "none" else "mean"

    def call():
        loss = fn(leaf, target, reduction=reduction)
        (loss.sum() if mode == "none" else loss).backward()
        leaf.grad = None  # freed before the other implementation runs: the same heap for both
    return call


def calls_per_sample(call, target_s):
    """How many calls make a sample of about ``target_s`` seconds (at least 1)."""
    call()
    t0 = time.perf_counter()
    call()
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(target_s / once))


def sample_pair(ours, theirs, k):
    """Seconds per call of ``ours`` and ``theirs`` over ``k`` calls of each, interleaved call
    by call (which goes first alternates): both meet the same allocator and cache states,
    which a block of one implementation's calls after a block of the other's does not (two
    runs of PyTorch's very loss differed by up to 1.7x that way)."""
    clock = time.perf_counter
    calls, totals = (ours, theirs), [0.0, 0.0]
    for i in range(k):
        first = i % 2
        t0 = clock()
        calls[first]()
        t1 = clock()
        calls[1 - first]()
        totals[first] += t1 - t0
        totals[1 - first] += clock() - t1
    return totals[0] / k, totals[1] / k


def time_pair(ours, theirs, samples, target_s):
    """Medians (seconds per call) of ``ours`` and ``theirs`` over ``samples`` samples."""
    k = min(calls_per_sample(ours, target_s), calls_per_sample(theirs, target_s))
    pairs = [sample_pair(ours, theirs, k) for _ in range(samples)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def served_by(x, target, mode):
    """Which implementation fusedce's call ran: "fusedce", or "pytorch" (the hand-off of
    ``fusedce/_route.py``; such a cell times PyTorch's loss against itself, its spread is
    the measurement's own)."""
    from fusedce import _route

    leaf = x.detach().requires_grad_(mode != "nograd")
    with torch.set_grad_enabled(mode != "nograd"):
        pytorch = (x.device.type == "cpu" and leaf.numel() < _route.SMALLEST) or \
            _route.pytorch_serves(leaf, target, None, 0.0)
    return "pytorch" if pytorch else "fusedce"


def run(args):
    device = torch.device(args.device)
    rows = [int(v) for v in args.rows.split(",")]
    classes = [int(v) for v in args.classes.split(",")]
    gen = torch.Generator().manual_seed(0)
    results = []
    for mode in args.modes.split(","):
        for dname in args.dtypes.split(","):
            for n in rows:
                for c in classes:
                    x = (torch.randn(n, c, generator=gen) * 2).to(device, DTYPES[dname])
                    target = torch.randint(0, c, (n,), generator=gen).to(device)
                    ours = make_call(fusedce.cross_entropy, x, target, mode)
                    theirs = make_call(F.cross_entropy, x, target, mode)
                    t_ours, t_theirs = time_pair(ours, theirs, args.samples, args.sample_ms / 1e3)
                    results.append(dict(mode=mode, dtype=dname, rows=n, classes=c,
                                        served_by=served_by(x, target, mode),
                                        fusedce_us=t_ours * 1e6, torch_us=t_theirs * 1e6,
                                        ratio=t_ours / t_theirs))
                    print(f"{mode:7s} {dname} {n:>5d} x {c:>6d}: fusedce {t_ours * 1e6:10.1f} us"
                          f"  torch {t_theirs * 1e6:10.1f} us  ratio {t_ours / t_theirs:5.2f}",
                          file=sys.stderr, flush=True)
    return results


def table(results, rows, classes):
    """Markdown tables of the ratios, one per (mode, dtype): rows N, columns C."""
    out = []
    keys = sorted({(r["mode"], r["dtype"]) for r in results}, key=lambda k: (
        MODES.index(k[0]) if k[0] in MODES else 9, k[1]))
    for mode, dname in keys:
        cells = {(r["rows"], r["classes"]): r for r in results
                 if r["mode"] == mode and r["dtype"] == dname}
        out.append(f"\n{mode}, {dname}: fusedce / F.cross_entropy (median time ratio; *: "
                   "fusedce's own path, else its hand-off to PyTorch's loss)\n")
        out.append("| N \\ C | " + " | ".join(f"{c:,}" for c in classes) + " |")
        out.append("|---" * (len(classes) + 1) + "|")
        for n in rows:
            vals = [f"{cells[(n, c)]['ratio']:.2f}"
                    f"{'*' if cells[(n, c)]['served_by'] == 'fusedce' else ''}"
                    if (n, c) in cells else "" for c in classes]
            out.append(f"| {n:,} | " + " | ".join(vals) + " |")
    worst = max(results, key=lambda r: r["ratio"])
    out.append(f"\nworst: {worst['ratio']:.2f} ({worst['mode']}, {worst['dtype']}, "
               f"{worst['rows']} x {worst['classes']})")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help="default: %(default)s")
    p.add_argument("--dtypes", default="fp32,bf16", help="default: %(default)s")
    p.add_argument("--rows", default=ROWS, help="row counts N (default: %(default)s)")
    p.add_argument("--classes", default=CLASSES, help="class counts C (default: %(default)s)")
    p.add_argument("--samples", type=int, default=9,
                   help="samples per implementation and cell (default: %(default)s)")
    p.add_argument("--sample-ms", type=float, default=20.0,
                   help="length of a sample, in ms (default: %(default)s)")
    p.add_argument("--device", type=device, default="cpu", help="default: %(default)s")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--own", action="store_true",
                   help="time fusedce's own implementation at every size (no hand-off of "
                        "small calls to PyTorch): where it wins is what the hand-off uses")
    add_out_argument(p, "grid_<device>.csv")
    args = parse_checked(p, argv)
    for name in ("modes", "dtypes"):
        bad = [v for v in getattr(args, name).split(",")
               if v not in (MODES if name == "modes" else DTYPES)]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.own:
        from fusedce import _route
        _route.set_hand_off(False)
    results = run(args)
    rows = [int(v) for v in args.rows.split(",")]
    classes = [int(v) for v in args.classes.split(",")]
    print(table(results, rows, classes))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"grid_{torch.device(args.device).type}"
                        f"{'_own' if args.own else ''}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
