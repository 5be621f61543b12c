"""Cross-entropy over (tokens, V) logits: fusedce against its peers, time and peak memory.

Cases (each a loss ``fn(logits, target)`` with PyTorch's mean reduction):

- ``eager``: ``torch.nn.functional.cross_entropy``;
- ``compile``: ``torch.compile(F.cross_entropy)`` (compiled once per process, outside the
  timing);
- ``fusedce``: ``fusedce.cross_entropy``, the default (non-destructive) path;
- ``fusedce_inplace``: ``fusedce.cross_entropy(..., inplace_backward=True)``: the gradient is
  written over the logits during the forward (forward+backward only);
- ``liger``, ``quack``: Liger-Kernel's and quack's losses, CUDA only, when importable.

Passes: ``fwd`` (no autograd) and ``fwd_bwd`` (forward, then ``backward()`` into a leaf's
``.grad``). Before every timed call the logits are copied from a pristine tensor into a
working buffer (untimed), so every case starts from the same cache state and the in-place
case has fresh logits to destroy.

Time: cases run interleaved in one process, ``repeats`` rounds after a warm-up; the median
is reported, ratios are between medians of the same run. Bytes: ``bench.byte_model``; GB/s
also as a fraction of a measured ``copy_`` bandwidth on the same device.

Memory: on the CPU each case runs in a fresh subprocess (``python -m bench --memory-probe``)
that runs it once (warm-up, compilation), resets the peak resident set (``VmHWM`` through
``/proc/self/clear_refs``), runs it again and reports the peak above the resident set
before that second run, less the gradient the step must produce (the logits' size for
``fwd_bwd``, nothing for ``fwd`` or the in-place case, whose gradient is the logits); glibc's
mmap threshold is fixed at 1 MiB there so that no buffer hides in memory freed earlier. On
CUDA: ``torch.cuda.max_memory_allocated`` above the inputs, less the same.
"""

import functools
import gc
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
from bench.byte_model import ce_bytes, copy_bytes
from fusedce import _route

CASES = ("eager", "compile", "fusedce", "fusedce_inplace", "liger", "quack")
PASSES = ("fwd", "fwd_bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VOCAB = 50_257
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unavailable(Exception):
    """A peer that cannot run here (not installed, or not on this device)."""


def _liger():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel not importable ({e.__class__.__name__})") from None
    loss = LigerCrossEntropyLoss()
    return lambda x, t: loss(x, t)


def _quack():
    try:
        from quack.cross_entropy import cross_entropy
    except ImportError as e:
        raise Unavailable(f"quack not importable ({e.__class__.__name__})") from None
    return lambda x, t: cross_entropy(x, t).mean()


_COMPILED = {}


def loss_fn(case, device):
    """The loss of ``case`` as ``fn(x, target)``; raises ``Unavailable`` for a missing peer."""
    device = torch.device(device)
    if case == "eager":
        return F.cross_entropy
    if case == "compile":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(F.cross_entropy)
        return _COMPILED["fn"]
    if case == "fusedce":
        return fusedce.cross_entropy
    if case == "fusedce_inplace":
        return lambda x, t: fusedce.cross_entropy(x, t, inplace_backward=True)
    if case in ("liger", "quack"):
        if device.type != "cuda":
            raise Unavailable(f"{case} runs on CUDA only")
        return _liger() if case == "liger" else _quack()
    raise ValueError(f"unknown case {case!r}; cases: {CASES}")


def applies(case, pass_):
    """The in-place case only exists with a backward."""
    return not (case == "fusedce_inplace" and pass_ == "fwd")


def logits_distribution():
    """``(mean, std)`` of the benchmark's logits: N(0, 2) (an LM's spread) unless
    ``FUSEDCE_BENCH_LOGITS=MEAN,STD`` (``python -m bench --logits``; e.g. -60,3, the level
    of a pretrained GPT-2's logits) says otherwise."""
    mean, std = os.environ.get("FUSEDCE_BENCH_LOGITS", "0,2").split(",")
    return float(mean), float(std)


def make_inputs(tokens, vocab=VOCAB, dtype="fp32", device="cpu", seed=0):
    """``(logits, target)``: logits ~ ``logits_distribution()``, uniform targets."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = logits_distribution()
    x = (torch.randn(tokens, vocab, generator=gen) * std + mean).to(device, DTYPES[dtype])
    t = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    return x, t


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step(fn, pass_, x):
    """Runs one ``pass_`` of ``fn`` on the logits ``x`` (destroyed by the in-place case);
    returns what keeps its result alive (the loss, and the gradient for ``fwd_bwd``)."""
    t = step.target
    if pass_ == "fwd":
        with torch.no_grad():
            return fn(x, t)
    x.requires_grad_(True)
    loss = fn(x, t)
    loss.backward()
    return loss, x.grad


def time_cases(cases, pass_, tokens, vocab=VOCAB, dtype="fp32", device="cpu", repeats=5,
               warmup=1, seed=0, others=None):
    """Median seconds of each runnable case, interleaved; ``{case: seconds}`` and
    ``{case: reason}`` for the cases skipped. ``others``: ``{name: fn(x)}`` timed first
    among them on the same fresh logits (``bench.floor``'s passes)."""
    pristine, target = make_inputs(tokens, vocab, dtype, device, seed)
    step.target = target
    runs, skipped = dict(others or {}), {}
    for case in cases:
        if not applies(case, pass_):
            continue
        try:
            runs[case] = functools.partial(step, loss_fn(case, device), pass_)
        except Unavailable as e:
            skipped[case] = str(e)
    times = {case: [] for case in runs}
    work = torch.empty_like(pristine)
    for r in range(warmup + repeats):
        for case, run in runs.items():
            x = work.detach()
            x.copy_(pristine)  # untimed: the same start for every case, fresh logits
            _sync(device)
            start = time.perf_counter()
            keep = run(x)
            _sync(device)
            elapsed = time.perf_counter() - start
            del keep, x
            if r >= warmup:
                times[case].append(elapsed)
    return {case: statistics.median(ts) for case, ts in times.items()}, skipped


def copy_bandwidth(tokens, vocab=VOCAB, dtype="fp32", device="cpu", repeats=5):
    """Bytes per second of ``dst.copy_(src)`` over logits-sized tensors (both existing)."""
    src = torch.empty(tokens, vocab, dtype=DTYPES[dtype], device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    ts = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        ts.append(time.perf_counter() - start)
    return copy_bytes(src.numel(), src.dtype) / statistics.median(ts[1:])


# ------------------------------------------------------------------------------------------
# Memory


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    """VmHWM back to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def served_by_pytorch(case, pass_, tokens, vocab=VOCAB, dtype="fp32", device="cpu"):
    """Whether a fusedce case's call is one ``backend="auto"`` hands to PyTorch's own loss
    (a CPU call this small: ``fusedce/_route.py``), as ``fusedce.cross_entropy`` decides it
    for the step's logits and class-index targets."""
    if not case.startswith("fusedce") or torch.device(device).type != "cpu":
        return False
    return _route.serves_shape(tokens, vocab, DTYPES[dtype], grad=pass_ != "fwd")


def grad_bytes(case, pass_, tokens, vocab, dtype):
    """The gradient a step must produce: logits-sized for ``fwd_bwd`` (the in-place case
    writes it over the logits, so it costs nothing more, unless PyTorch's loss serves the
    call: then in place has no effect)."""
    if pass_ == "fwd" or (case == "fusedce_inplace"
                          and not served_by_pytorch(case, pass_, tokens, vocab, dtype)):
        return 0
    return tokens * vocab * torch.empty((), dtype=DTYPES[dtype]).element_size()


def memory_probe(case, pass_, tokens, vocab=VOCAB, dtype="fp32"):
    """In this (fresh) process: peak RSS of one step above the inputs, less the gradient."""
    fn = loss_fn(case, "cpu")
    x, target = make_inputs(tokens, vocab, dtype)
    step.target = target
    keep = step(fn, pass_, x.detach())  # warm-up: compilation, worker threads, allocator
    del keep
    x.grad = None
    x.requires_grad_(False)
    gc.collect()
    # the gradient buffer fusedce keeps for reuse is freed, so that the measured step
    # allocates (and counts) its gradient as the first step of a process does
    fusedce.empty_cache()
    x2 = x.detach()
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    keep = step(fn, pass_, x2)
    peak = _status_bytes("VmHWM")
    del keep
    return peak - base - grad_bytes(case, pass_, tokens, vocab, dtype)


def measure_memory(case, pass_, tokens, vocab=VOCAB, dtype="fp32", device="cpu"):
    """Peak bytes of one step above its inputs and its gradient; None if the case cannot
    run. CPU: in a fresh subprocess; CUDA: ``max_memory_allocated``."""
    if torch.device(device).type == "cuda":
        try:
            fn = loss_fn(case, device)
        except Unavailable:
            return None
        x, target = make_inputs(tokens, vocab, dtype, device)
        step.target = target
        keep = step(fn, pass_, x.detach().clone())
        del keep
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        keep = step(fn, pass_, x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del keep
        return peak - base - grad_bytes(case, pass_, tokens, vocab, dtype)
    cmd = [sys.executable, "-m", "bench", "--memory-probe",
           json.dumps([case, pass_, tokens, vocab, dtype])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.setdefault("FUSEDCE_BENCH_THREADS", str(torch.get_num_threads()))
    # glibc serves a buffer from memory freed earlier (resident already) once its adaptive
    # mmap threshold has grown: a fixed 1 MiB threshold makes every large buffer a fresh
    # mapping, counted in the peak whatever ran before
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        if "Unavailable" in out.stderr:
            return None
        raise RuntimeError(f"memory probe {case}/{pass_} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def run_case_set(tokens, dtype, pass_, cases=CASES, vocab=VOCAB, device="cpu", repeats=5,
                 warmup=1, memory=True, copy_bps=None):
    """Rows (dicts) for one (tokens, dtype, pass): time, ratios, GB/s, memory."""
    times, skipped = time_cases(cases, pass_, tokens, vocab, dtype, device, repeats, warmup)
    logits_bytes = tokens * vocab * torch.empty((), dtype=DTYPES[dtype]).element_size()
    rows = []
    for case, sec in times.items():
        model_pass = "fwd_bwd_inplace" if case == "fusedce_inplace" else pass_
        moved = ce_bytes(tokens, vocab, DTYPES[dtype], model_pass)
        mem = measure_memory(case, pass_, tokens, vocab, dtype, device) if memory else None
        rows.append({
            "device": device_name(device), "dtype": dtype, "tokens": tokens, "vocab": vocab,
            "pass": pass_, "case": case, "time_ms": round(sec * 1e3, 2),
            # a fusedce case whose call PyTorch's own loss serves (small, on the CPU)
            "served_by": ("PyTorch" if served_by_pytorch(case, pass_, tokens, vocab, dtype,
                                                         device) else ""),
            "speedup_vs_eager": round(times["eager"] / sec, 2) if "eager" in times else None,
            "speedup_vs_compile": (round(times["compile"] / sec, 2) if "compile" in times
                                   else None),
            "model_bytes": moved, "gbps": round(moved / sec / 1e9, 1),
            "pct_of_copy": round(100 * moved / sec / copy_bps, 1) if copy_bps else None,
            "extra_mib": None if mem is None else round(mem / 2**20, 1),
            "extra_pct_of_logits": None if mem is None else round(100 * mem / logits_bytes, 2),
        })
    return rows, skipped
