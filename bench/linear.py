"""Fused linear + cross-entropy against the unfused head and PyTorch's chunked one.

One training step of a language-model head, forward and backward: ``hidden`` (tokens, H)
and the head weight ``W`` (V, H) in, the loss and the gradients of both out. Cases:

- ``unfused``: ``F.cross_entropy(F.linear(hidden, W), target)``, PyTorch eager;
- ``fusedce``: ``fusedce.linear_cross_entropy(hidden, W, target)``, default chunk size;
- ``torch_chunked``: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``;
- ``liger`` (CUDA only, when ``liger_kernel`` is installed): Liger-Kernel's fused linear
  cross-entropy.

Time: the cases run interleaved in this process (``repeats`` rounds after ``warmup``), the
median is reported with its ratio to ``unfused``. Memory on the CPU: each case runs once
in a fresh subprocess that reads its peak resident set (``VmHWM``, reset after the inputs
exist); reported is the peak *above* the inputs and the gradients (``hidden.grad``,
``W.grad``), i.e. what the loss itself costs. On CUDA the same from
``torch.cuda.max_memory_allocated``.

``python -m bench.linear`` prints the table and can write it as CSV; ``run(...)`` returns the
rows as dicts for ``python -m bench``.
"""

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fusedce
from bench.ce import _status_bytes
from bench.output import device

CASES = ("unfused", "fusedce", "torch_chunked")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(tokens, hidden, vocab, dtype="fp32", device="cpu", seed=0):
    """``(hidden_states, W, target)``; the first two are leaves that require grad.

    Scales of a trained GPT-2 head: unit-ish hidden states, W entries ~ N(0, 0.02).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(device, DTYPES[dtype])
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, DTYPES[dtype])
    target = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    return x.requires_grad_(), w.requires_grad_(), target


def _liger_loss():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # optional

    loss_fn = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss_fn(w, x, t)


def loss_fn(case, chunk_size=None):
    """The loss of ``case`` as ``f(hidden, W, target)``."""
    if case == "unfused":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    if case == "fusedce":
        return lambda x, w, t: fusedce.linear_cross_entropy(x, w, t, chunk_size=chunk_size)
    if case == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)
    if case == "liger":
        return _liger_loss()
    raise ValueError(f"unknown case {case!r}")


def step(fn, x, w, target):
    """One forward + backward; the gradients are left in ``x.grad`` / ``w.grad``."""
    x.grad = w.grad = None
    fn(x, w, target).backward()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_cases(cases, tokens, hidden, vocab, dtype="fp32", device="cpu", repeats=3,
               warmup=1, chunk_size=None):
    """Seconds per forward+backward of each case, measured interleaved: ``{case: [s, ...]}``."""
    x, w, target = make_inputs(tokens, hidden, vocab, dtype, device)
    fns = {case: loss_fn(case, chunk_size) for case in cases}
    times = {case: [] for case in cases}
    for i in range(warmup + repeats):
        for case, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            step(fn, x, w, target)
            _sync(device)
            if i >= warmup:
                times[case].append(time.perf_counter() - start)
    return times


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _grad_bytes(x, w):
    return x.numel() * x.element_size() + w.numel() * w.element_size()


def memory_probe(case, tokens, hidden, vocab, dtype="fp32", chunk_size=None):
    """In this (fresh) process: the peak RSS of one step above inputs and gradients, bytes."""
    fn = loss_fn(case, chunk_size)
    step(fn, *make_inputs(8, 16, 64, dtype))  # libraries' one-time set-up, not the loss's
    x, w, target = make_inputs(tokens, hidden, vocab, dtype)
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    base = _status_bytes("VmRSS")
    step(fn, x, w, target)
    peak = _status_bytes("VmHWM")
    return {"peak_above_inputs": peak - base, "grad_bytes": _grad_bytes(x, w),
            "extra_bytes": peak - base - _grad_bytes(x, w)}


def measure_memory(case, tokens, hidden, vocab, dtype="fp32", device="cpu", chunk_size=None):
    """Peak bytes above inputs and gradients of one step of ``case``."""
    if torch.device(device).type == "cuda":
        x, w, target = make_inputs(tokens, hidden, vocab, dtype, device)
        fn = loss_fn(case, chunk_size)
        step(fn, x, w, target)  # compile / autotune outside the measurement
        x.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn, x, w, target)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - _grad_bytes(x, w)
    cmd = [sys.executable, "-m", "bench.linear", "--memory-probe", case, "--tokens",
           str(tokens), "--hidden", str(hidden), "--vocab", str(vocab), "--dtype", dtype]
    if chunk_size is not None:
        cmd += ["--chunk-size", str(chunk_size)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root,
                                                                    os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def _device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(tokens=8192, hidden=768, vocab=50_257, dtype="fp32", device="cpu", repeats=3,
        warmup=1, cases=CASES, memory=True, chunk_size=None):
    """Benchmark ``cases``; returns one dict per case (``unfused`` is the ratio's base).

    Keys: case, device, dtype, tokens, hidden, vocab, chunk_size (fusedce's rows per chunk),
    time_ms (median of ``repeats``), time_ratio (to unfused), extra_mib (peak above inputs and
    gradients; None without ``memory``), mem_ratio (to unfused).
    """
    cases = list(cases)
    if "unfused" not in cases:
        cases.insert(0, "unfused")
    times = time_cases(cases, tokens, hidden, vocab, dtype, device, repeats, warmup,
                       chunk_size)
    mems = {case: measure_memory(case, tokens, hidden, vocab, dtype, device, chunk_size)
            for case in cases} if memory else {}
    rows_per_chunk = chunk_size or fusedce.linear.chunk_rows(
        tokens, hidden, vocab, DTYPES[dtype].itemsize, torch.device(device).type)
    median = {case: statistics.median(ts) for case, ts in times.items()}
    rows = []
    for case in cases:
        mem = mems.get(case)
        rows.append({
            "case": case, "device": _device_name(device), "dtype": dtype, "tokens": tokens,
            "hidden": hidden, "vocab": vocab,
            "chunk_size": rows_per_chunk if case == "fusedce" else None,
            "time_ms": round(median[case] * 1e3, 1),
            "time_ratio": round(median[case] / median["unfused"], 3),
            "extra_mib": None if mem is None else round(mem / 2**20, 1),
            "mem_ratio": None if mem is None else round(mem / mems["unfused"], 4),
        })
    return rows


def format_table(rows):
    """A markdown table of ``rows``."""
    cols = ["case", "device", "dtype", "tokens", "hidden", "vocab", "chunk_size", "time_ms",
            "time_ratio", "extra_mib", "mem_ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in cols)
                     + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50_257)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", type=device, default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated, from: " + ", ".join(CASES + ("liger",)))
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the timing and the memory probes")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.csv and not args.memory_probe:  # before any work: the CSV can be written
        from bench.output import check_out_dir

        if os.path.isdir(args.csv):
            parser.error(f"--csv {args.csv}: is a folder, not a file")
        problem = check_out_dir(os.path.dirname(os.path.abspath(args.csv)), "--csv folder")
        if problem:
            parser.error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["FUSEDCE_BENCH_THREADS"] = str(args.threads)  # for the probes
    elif os.environ.get("FUSEDCE_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FUSEDCE_BENCH_THREADS"]))
    if args.memory_probe:
        result = memory_probe(args.memory_probe, args.tokens, args.hidden, args.vocab,
                              args.dtype, args.chunk_size)
        print(json.dumps(result))
        return
    rows = run(args.tokens, args.hidden, args.vocab, args.dtype, args.device, args.repeats,
               args.warmup, args.cases.split(","), not args.no_memory, args.chunk_size)
    print(format_table(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
