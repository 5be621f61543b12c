"""One command for a CUDA machine: are the kernels right, and how fast are they?

    python bench/gpu_check.py                 # correctness, then the timing table (< 5 min)
    python bench/gpu_check.py --sweep         # also the launch-parameter sweep (issue 8)
    python bench/gpu_check.py --sweep-only    # only the sweep
    python bench/gpu_check.py --quick         # N = 8,192 only, no torch.compile
    compute-sanitizer --tool memcheck python bench/gpu_check.py --sanitize
                                              # small odd launches only, for the sanitizer

1. Correctness against PyTorch in float64 on the GPU (fp32, bf16, fp16; V = 50,257 and odd
   sizes; every reduction, ignore_index, class weights, label smoothing, in-place mode with
   a per-row upstream gradient, rows that do not start on a 16-byte boundary, a padded row
   stride whose padding must stay untouched). Exit status 1 if any case fails.
2. Timing (``triton.testing.do_bench`` medians; it clears L2 before every call and the
   logits, 0.8 to 6.6 GB, are far larger than L2) of the forward and forward+backward at
   N = 8,192 and 32,768 tokens x 50,257, bf16 (``--dtypes bf16,fp32`` adds fp32), against
   ``F.cross_entropy`` eager, ``torch.compile`` of it and Liger-Kernel (if importable).
   Printed as a table of ms, GB/s under the byte model of ``bench/byte_model.py``, the
   percentage of a device-to-device copy measured in the same run, speed ratios and the peak
   memory above the inputs; written to ``<out>/gpu_check_<gpu>.csv``.
3. The fused linear + cross-entropy (issue 5): ``fusedce.linear_cross_entropy`` against the
   unfused float64 reference (loss and the gradients of the hidden states and the head
   weight), then forward+backward at 8,192 tokens x hidden 768 x 50,257 (bf16) against the
   unfused ``F.linear`` + ``F.cross_entropy``, PyTorch's chunked ``F.linear_cross_entropy``
   and Liger-Kernel's fused linear cross-entropy (if importable): time and peak memory, the
   ratios to Liger printed, written to ``<out>/gpu_linear_<gpu>.csv``
   (``--no-linear`` leaves it out).
4. ``--sweep``: the row kernels alone under other launch choices (BLOCK_SIZE, num_warps,
   16-byte aligned body on or off), each timed at N = 8,192 and 32,768 for bf16 and fp32,
   written to ``<out>/gpu_sweep_<gpu>.csv`` with the best choice per case printed.

``--sanitize`` runs only small launches of the row kernels on odd shapes (rows at every
16-byte phase, padded and offset views, targets equal to ignore_index, out of range and
negative, in place and the scale kernel) and checks their values; under
``compute-sanitizer --tool memcheck`` it is the memory check of issue 8.

Without CUDA it prints one line saying so and exits with status 2. ``--dry-run`` instead
runs every step on the CPU under Triton's interpreter with small shapes (V = 1,001, N = 16,
8 rows per correctness case, no torch.compile; the figures mean nothing): a check that the
script itself works.
"""

import argparse
import csv
import datetime
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # ``bench.byte_model`` when run as ``python bench/gpu_check.py``

V = 50_257  # GPT-2's vocabulary: 100,514 bytes per bf16 row, rows at every 16-byte phase
TOKENS = (8_192, 32_768)


def _fail(message, status=2):
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(status)


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                   help="token counts N of the timing table (comma-separated)")
    p.add_argument("--dtypes", default="bf16",
                   help="dtypes of the timing table (bf16: the dtype of the GPU targets; "
                        "bf16,fp32 adds about a minute and a half, mostly torch.compile)")
    p.add_argument("--quick", action="store_true", help="N = 8,192 only, no torch.compile")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--no-linear", action="store_true",
                   help="leave out the fused linear + cross-entropy check and timing")
    p.add_argument("--sweep", action="store_true", help="also run the launch-parameter sweep")
    p.add_argument("--sweep-only", action="store_true", help="only the sweep")
    p.add_argument("--blocks", default="4096,8192,16384", help="sweep: BLOCK_SIZE values")
    p.add_argument("--warps", default="4,8,16", help="sweep: num_warps values")
    p.add_argument("--out", default=os.path.join(HERE, "out"),
                   help="CSV directory (default: the untracked bench/out/)")
    p.add_argument("--vocab", type=int, default=V, help="classes per row (default GPT-2's)")
    p.add_argument("--sanitize", action="store_true",
                   help="only small launches on odd shapes (run under compute-sanitizer)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: every step on the CPU under the Triton interpreter, tiny "
                        "shapes, CSVs to a temporary directory (tests the script only)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.no_compile = "8192", True
    if args.dry_run:
        args.tokens, args.no_compile, args.vocab = "16", True, 1001
        args.dtypes = "bf16,fp32"
        args.blocks, args.warps = "512,1024", "1,2"
        if args.out == os.path.join(HERE, "out"):
            import tempfile

            args.out = tempfile.mkdtemp(prefix="gpu_check_dry_run_")
    return args


class _Device:
    """The few device calls the check makes; the dry run puts CPU stand-ins in their place."""

    def __init__(self, torch, dry_run):
        self.torch, self.dry_run = torch, dry_run
        if dry_run:
            self.device = torch.device("cpu")
            self.name = "CPU dry run (Triton interpreter)"
        else:
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.name = torch.cuda.get_device_name(self.device)
        self.fused_kwargs = {"backend": "triton"} if dry_run else {}

    def sync(self):
        if not self.dry_run:
            self.torch.cuda.synchronize(self.device)

    def empty_cache(self):
        if not self.dry_run:
            self.torch.cuda.empty_cache()

    def peak_extra_mib(self, fn):
        """Peak memory above what is allocated now, during one call of ``fn``."""
        if self.dry_run:
            fn()
            return float("nan")
        cuda = self.torch.cuda
        cuda.synchronize(self.device)
        cuda.reset_peak_memory_stats(self.device)
        held = cuda.memory_allocated(self.device)
        fn()
        cuda.synchronize(self.device)
        return (cuda.max_memory_allocated(self.device) - held) / 2**20


def _cpu_do_bench(fn, warmup=None, rep=None, grad_to_none=None, return_mode="median"):
    """The dry run's stand-in for ``triton.testing.do_bench``: median of 3 calls, in ms."""
    times = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


DTYPES = {}  # name -> torch dtype, filled once torch is imported


def _dtype(name):
    return DTYPES[name]


# ----------------------------------------------------------------------------------------
# 1. Correctness


def _rel_err(a, b, floor=1e-30):
    """max |a - b| / max(max |b|, floor): one number per tensor, NaN positions required to
    agree (``floor``: the scale below which ``b`` counts as 0)."""
    a, b = a.double(), b.double()
    nan_a, nan_b = a.isnan(), b.isnan()
    if not bool((nan_a == nan_b).all()):
        return float("inf")
    a, b = a[~nan_b], b[~nan_b]
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


TOL = {"fp32": 2e-5, "bf16": 2e-2, "fp16": 4e-3}  # relative to the largest reference value


def _correctness_cases():
    """``(name, dtype, n_rows, n_cols, options)``: options of ``fusedce.cross_entropy``
    plus ``pad`` (extra columns of row stride), ``offset`` (elements before row 0) and
    ``shift`` (added to every fp32 logit before the cast: rows far from 0)."""
    cases = []
    for dt in ("fp32", "bf16", "fp16"):
        for red in ("mean", "sum", "none"):
            cases.append((f"{red}", dt, 96, V, {"reduction": red}))
        cases.append(("ignore_index+smoothing", dt, 96, V,
                      {"ignore_index": 7, "label_smoothing": 0.1}))
        cases.append(("weight+smoothing", dt, 96, V, {"weight": True, "label_smoothing": 0.05}))
        cases.append(("inplace-mean", dt, 96, V, {"inplace_backward": True}))
        cases.append(("inplace-none", dt, 96, V,
                      {"inplace_backward": True, "reduction": "none"}))
        cases.append(("padded-stride+offset", dt, 64, V, {"pad": 5, "offset": 3}))
        cases.append(("inplace-padded-stride+offset", dt, 64, V,
                      {"pad": 5, "offset": 3, "inplace_backward": True}))
        # rows far from 0: the saved lse must keep its log-sum (float64) and the loss take
        # (max - x_t) + log-sum, in the backward kernel as in the forward's
        cases.append(("far-from-0", dt, 32, V, {"shift": 1e4, "reduction": "none"}))
        cases.append(("few-rows-far-from-0", dt, 4, V,
                      {"shift": -1e4, "split": True, "label_smoothing": 0.1}))
        for n_cols in (1, 7, 100, 8193):  # one column, shorter than 16 bytes, > one block
            cases.append((f"C={n_cols}", dt, 37, n_cols, {"reduction": "sum"}))
        # fewer rows than SMs: each row split over several programs (kernels/split_rows.py;
        # forced to 3 splits in a dry run, where there are no SMs to count)
        cases.append(("few-rows", dt, 1, V, {"split": True}))
        cases.append(("few-rows-weight+smoothing", dt, 8, V,
                      {"split": True, "weight": True, "label_smoothing": 0.1}))
        cases.append(("few-rows-inplace-none", dt, 4, V,
                      {"split": True, "inplace_backward": True, "reduction": "none"}))
        cases.append(("few-rows-128k", dt, 8, 128_256, {"split": True, "ignore_index": 7}))
        # the loss extras (each alone, all with in place and aux outputs; large vocabularies)
        cases.append(("logit_scale", dt, 96, V, {"logit_scale": 0.5}))
        cases.append(("softcap", dt, 96, V, {"softcap": 30.0, "label_smoothing": 0.1}))
        cases.append(("z-loss-weight", dt, 96, V, {"lse_square_scale": 1e-4, "weight": True}))
        cases.append(("all-extras-inplace-none", dt, 64, V, dict(
            EXTRAS, inplace_backward=True, reduction="none")))
        cases.append(("all-extras-256k", dt, 8, 256_000, dict(EXTRAS, label_smoothing=0.1)))
        cases.append(("softcap-128k-inplace", dt, 8, 128_256,
                      {"softcap": 30.0, "inplace_backward": True}))
    return cases


EXTRAS = {"logit_scale": 0.7, "softcap": 30.0, "lse_square_scale": 1e-4, "return_aux": True}


def _reference(torch, F, x64, target, weight, ignore_index, reduction, smoothing, opts):
    """``(loss, lse, entropy)`` in float64 from the definitions of the loss extras in
    ``opts`` (lse and entropy None without ``return_aux``)."""
    z = x64 * opts.get("logit_scale", 1.0)
    if opts.get("softcap") is not None:
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    loss = F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=smoothing)
    lse = torch.logsumexp(z, 1)
    scale = opts.get("lse_square_scale", 0.0)
    if scale:
        # probabilities ignore no row
        kept = (torch.ones_like(lse, dtype=torch.bool) if target.is_floating_point()
                else target != ignore_index)
        zl = torch.where(kept, scale * lse ** 2, 0.0)
        loss = loss + {"none": zl, "sum": zl.sum(), "mean": zl.sum() / kept.sum()}[reduction]
    if not opts.get("return_aux"):
        return loss, None, None
    logp = torch.log_softmax(z, 1)
    return loss, lse.detach(), -(logp.exp() * logp).sum(1).detach()


def check_correctness(torch, F, fusedce, dev, max_rows=None):
    """Runs every case; returns the number of failures (printed as they happen)."""
    from fusedce.kernels import split_rows

    device = dev.device
    gen = torch.Generator(device=device).manual_seed(0)
    failures = 0
    print(f"correctness against float64 PyTorch on {dev.name}")
    for name, dt, n, c, opts in _correctness_cases():
        opts = dict(opts)
        n = min(n, max_rows or n)
        pad, offset, shift = opts.pop("pad", 0), opts.pop("offset", 0), opts.pop("shift", 0.0)
        split_rows.FORCE_SPLITS = 3 if (opts.pop("split", False) and dev.dry_run) else None
        dtype = _dtype(dt)
        # logits: a view into a larger buffer when padded or offset (rows off 16 bytes)
        buf = torch.randn(offset + n * (c + pad) + 16, generator=gen, device=device)
        buf = (buf * 3 + shift).to(dtype)
        x = buf[offset:offset + n * (c + pad)].view(n, c + pad)[:, :c]
        target = torch.randint(0, c, (n,), generator=gen, device=device)
        target[0], target[-1] = 0, c - 1
        ignore_index = opts.get("ignore_index", -100)
        target[1::9] = ignore_index
        weight = None
        if opts.pop("weight", False):
            weight = torch.rand(c, generator=gen, device=device) + 0.5
        reduction = opts.get("reduction", "mean")
        upstream = (torch.randn(n, generator=gen, device=device) if reduction == "none"
                    else torch.randn((), generator=gen, device=device)).to(dtype)

        x64 = x.detach().double().requires_grad_(True)
        ref, ref_lse, ref_entropy = _reference(
            torch, F, x64, target, None if weight is None else weight.double(), ignore_index,
            reduction, opts.get("label_smoothing", 0.0), opts)
        (ref_grad,) = torch.autograd.grad(ref, x64, upstream.double())

        # the padded / offset cases run on the view itself (in-place mode writes into buf),
        # and every element of buf outside the logits must keep its value
        outside = torch.ones(buf.shape, dtype=torch.bool, device=device)
        outside[offset:offset + n * (c + pad)].view(n, c + pad)[:, :c] = False
        before = buf[outside].clone()
        xin = (x.detach() if (pad or offset) else x.detach().clone()).requires_grad_(True)
        try:
            out = fusedce.cross_entropy(xin, target, weight=weight, **opts,
                                        **dev.fused_kwargs)
            loss = out.loss if opts.get("return_aux") else out
            (grad,) = torch.autograd.grad(loss, xin, upstream)
            dev.sync()
            errs = {"loss": _rel_err(loss, ref), "grad": _rel_err(grad, ref_grad)}
            if ref_lse is not None:  # fp32 statistics of the same rounded logits
                errs["lse"] = _rel_err(out.lse, ref_lse) * TOL[dt] / TOL["fp32"]
                errs["entropy"] = _rel_err(out.entropy, ref_entropy) * TOL[dt] / TOL["fp32"]
            untouched = torch.equal(buf[outside], before)
            ok = all(e <= TOL[dt] for e in errs.values()) and untouched
            detail = " ".join(f"{k} {v:.1e}" for k, v in errs.items())
            if not untouched:
                detail += " WROTE OUTSIDE THE LOGITS"
        except Exception as e:  # a crash is a failed case, not the end of the check
            ok, detail = False, f"{type(e).__name__}: {e}"
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {dt:<4} {n:>3}x{c:<6} {name:<30} {detail}")
    split_rows.FORCE_SPLITS = None
    return failures


def _strided_cases(torch, gen, device, c):
    """``(name, x, target)`` for the strided kernels: (N, C, d) logits, a 2-d view with
    strided classes, class probabilities (2-d and (N, C, d)); logits spread 3."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device) * 3

    def probs(*shape):
        return torch.softmax(randn(*shape), 1)

    t3 = torch.randint(0, c, (4, 3), generator=gen, device=device)
    t3[0, 1] = -100
    return [("(N,C,d)", randn(4, c, 3), t3),
            ("x[:,:,k]", randn(6, c, 2)[:, :, 1],
             torch.randint(0, c, (6,), generator=gen, device=device)),
            ("probabilities", randn(6, c), probs(6, c)),
            ("probabilities-(N,C,d)", randn(3, c, 2), probs(3, c, 2))]


def check_strided(torch, F, fusedce, dev, vocab=None):
    """The strided kernels (classes not contiguous, probability targets), plain and with
    every loss extra, fp32 and bf16, against float64 autograd of the definitions: the loss
    and the gradients of the logits (and of the probabilities). Returns the failures."""
    device = dev.device
    gen = torch.Generator(device=device).manual_seed(1)
    c = vocab or V
    failures = 0
    print(f"strided kernels and probability targets, C = {c}")
    for opts_name, opts in (("plain", {}), ("all-extras", EXTRAS)):
        for dt in ("fp32", "bf16"):
            for name, x, target in _strided_cases(torch, gen, device, c):
                soft = target.is_floating_point()
                x = x.to(_dtype(dt))
                target = target.to(_dtype(dt)) if soft else target
                kw = dict(opts, label_smoothing=0.1, reduction="sum")
                x64 = x.detach().double().requires_grad_(True)
                t64 = target.detach().double().requires_grad_(True) if soft else target
                rows = (lambda a: a.movedim(1, -1).reshape(-1, c)) if x.dim() > 2 else None
                ref, _, _ = _reference(
                    torch, F, rows(x64) if rows else x64,
                    (rows(t64) if soft else t64.reshape(-1)) if rows else t64, None, -100,
                    "sum", 0.1, opts)
                refs = torch.autograd.grad(ref, [x64, t64] if soft else [x64])
                xin = x.detach().clone().requires_grad_(True)
                tin = target.detach().clone().requires_grad_(True) if soft else target
                try:
                    out = fusedce.cross_entropy(xin, tin, **kw, **dev.fused_kwargs)
                    loss = out.loss if opts.get("return_aux") else out
                    grads = torch.autograd.grad(loss, [xin, tin] if soft else [xin])
                    dev.sync()
                    errs = {"loss": _rel_err(loss, ref), "grad": _rel_err(grads[0], refs[0])}
                    if soft:
                        errs["dtarget"] = _rel_err(grads[1], refs[1])
                    ok = all(e <= TOL[dt] for e in errs.values())
                    detail = " ".join(f"{k} {v:.1e}" for k, v in errs.items())
                except Exception as e:  # a crash is a failed case, not the end of the check
                    ok, detail = False, f"{type(e).__name__}: {e}"
                failures += not ok
                print(f"  {'ok  ' if ok else 'FAIL'} {dt:<4} {name:<22} {opts_name:<11} "
                      f"{detail}")
    return failures


def time_few_rows(torch, F, fusedce, do_bench, dev, vocabs=(50_257, 128_256),
                  rows=(1, 8, 32, 64, 128)):
    """Forward + backward (bf16) with fewer rows than SMs: fusedce with its split rows
    (automatic), fusedce with one program per row (splits off), and eager PyTorch, in ms,
    and the split count the launcher chose."""
    from fusedce.kernels import split_rows

    device = dev.device
    out = []
    print("\nfew rows, bf16 forward + backward (ms): split rows | one program per row | eager")
    for v in vocabs:
        for n in rows:
            x = (torch.randn(n, v, device=device) * 2).to(torch.bfloat16).requires_grad_()
            t = torch.randint(0, v, (n,), device=device)

            def step(fn, x=x, t=t):
                return lambda: fn(x, t).backward()

            chosen = split_rows.split_count(n, v, x.device)
            times = {}
            for label, force in (("split", 3 if dev.dry_run else None), ("one", 1)):
                split_rows.FORCE_SPLITS = force
                times[label] = _bench(do_bench, step(
                    lambda a, b: fusedce.cross_entropy(a, b, **dev.fused_kwargs)), [x])
            split_rows.FORCE_SPLITS = None
            times["eager"] = _bench(do_bench, step(F.cross_entropy), [x])
            print(f"  {n:>4} x {v:<7} splits {chosen:>2}: {times['split']:8.3f} | "
                  f"{times['one']:8.3f} | {times['eager']:8.3f}  "
                  f"(one / split {times['one'] / times['split']:.2f})")
            out.append({"rows": n, "vocab": v, "splits": chosen,
                        "split_ms": round(times["split"], 4), "one_program_ms":
                        round(times["one"], 4), "eager_ms": round(times["eager"], 4)})
    return out


def time_extras(torch, fusedce, do_bench, dev, tokens=8_192, vocabs=(V, 128_256, 256_000)):
    """Forward + backward (bf16) of each loss extra against the plain loss, in ms."""
    device = dev.device
    out = []
    print(f"\nloss extras, bf16 forward + backward, {tokens} tokens (ms, and / plain)")
    options = {"plain": {}, "logit_scale": {"logit_scale": 0.7}, "softcap": {"softcap": 30.0},
               "z_loss": {"lse_square_scale": 1e-4}, "return_aux": {"return_aux": True},
               "all": EXTRAS}
    for v in vocabs:
        x = (torch.randn(tokens, v, device=device) * 2).to(torch.bfloat16).requires_grad_()
        t = torch.randint(0, v, (tokens,), device=device)
        times = {}
        for name, kw in options.items():
            def step(kw=kw, x=x, t=t):
                out = fusedce.cross_entropy(x, t, **kw, **dev.fused_kwargs)
                (out.loss if kw.get("return_aux") else out).backward()
            times[name] = _bench(do_bench, step, [x])
        line = " ".join(f"{k} {ms:.3f} ({ms / times['plain']:.2f})" for k, ms in times.items())
        print(f"  V={v}: {line}")
        out += [{"tokens": tokens, "vocab": v, "option": k, "ms": round(ms, 4),
                 "vs_plain": round(ms / times["plain"], 3)} for k, ms in times.items()]
        del x, t  # the next vocabulary's logits in its place
    return out


def check_odd_launches(torch, dev):
    """Small launches of the row kernels, called directly, on odd shapes with every kind of
    target; their values are checked here and their memory accesses by compute-sanitizer
    when the script runs under it. Returns the number of failures."""
    from fusedce import cpu
    from fusedce.kernels import cross_entropy as ce

    device = dev.device
    gen = torch.Generator(device=device).manual_seed(1)
    failures = launches = 0
    for dt in ("fp32", "bf16", "fp16"):
        dtype = _dtype(dt)
        for n, c, pad, offset in ((3, 1, 0, 0), (5, 7, 0, 1), (9, 33, 3, 5), (6, 1001, 1, 3),
                                  (4, V, 0, 0), (3, V, 7, 1)):
            buf = torch.randn(offset + n * (c + pad), generator=gen, device=device).to(dtype)
            x = buf[offset:].view(n, c + pad)[:, :c]
            t = torch.randint(0, c, (n,), generator=gen, device=device)
            t[0] = -100  # ignored
            t[1 % n] = c  # out of range: NaN, and never read
            if n > 2:
                t[2] = -5  # negative, not ignore_index: NaN
            dloss = torch.randn(n, generator=gen, device=device)
            loss, lse = ce.ce_fwd(x, t)
            dx = ce.ce_bwd(x, t, lse, dloss)
            x_in = x.clone()
            ce.ce_fwd(x_in, t, grad_scale=torch.full((1,), 0.5, device=device))
            ce.ce_scale_(x_in, dloss)
            launches += 4
            ref_loss, _ = cpu.ce_fwd(x.double(), t)
            ref_dx = cpu.ce_bwd(x.double(), t, lse.double(), dloss.double())
            dev.sync()
            errs = (_rel_err(loss, ref_loss), _rel_err(dx, ref_dx),
                    _rel_err(x_in, ref_dx * 0.5))
            bad_rows = loss[1 % n].isnan() and dx[1 % n].isnan().all() and loss[0] == 0
            ok = all(e <= TOL[dt] for e in errs) and bool(bad_rows)
            failures += not ok
            if not ok:
                print(f"  FAIL odd launch {dt} {n}x{c} pad {pad} offset {offset}: "
                      f"errors {errs}, ignored/out-of-range rows right: {bool(bad_rows)}")
    f, n_launches = _odd_strided_launches(torch, dev, gen)
    failures += f
    launches += n_launches
    print(f"odd-shape launches: {launches} kernel launches, {failures} failure(s)")
    return failures


def _odd_strided_launches(torch, dev, gen):
    """The strided kernels on odd (N, C, L) shapes, class indices (ignored, out of range,
    negative) and probabilities, plain and with every loss extra (aux outputs, z-loss
    gradient), against ``fusedce.cpu`` in float64. Returns ``(failures, launches)``."""
    from fusedce import cpu
    from fusedce._args import Extras
    from fusedce.kernels import strided as st

    device = dev.device
    extras = Extras(logit_scale=0.7, softcap=30.0, lse_square_scale=1e-4, aux=True)
    failures = launches = 0
    for dt in ("fp32", "bf16"):
        for n, c, l_len in ((3, 1, 2), (2, 7, 3), (3, 33, 5), (2, 1001, 3)):
            x = (torch.randn(n, c, l_len, generator=gen, device=device) * 3).to(_dtype(dt))
            t = torch.randint(0, c, (n, l_len), generator=gen, device=device)
            t[0, 0], t[-1, -1] = -100, c  # ignored; out of range (NaN, never read)
            y = torch.softmax(torch.randn(n, c, l_len, generator=gen, device=device), 1)
            dloss = torch.randn(n, l_len, generator=gen, device=device)
            zg = torch.randn(n * l_len, generator=gen, device=device)
            for target in (t, y):
                for ex in (None, extras):
                    aux = torch.empty(2, n * l_len, device=device) if ex else None
                    loss, lse, s_ = st.ce_strided_fwd(x, target, label_smoothing=0.1,
                                                      extras=ex, aux_out=aux)
                    dx, _ = st.ce_strided_bwd(x, target, lse, s_, dloss, label_smoothing=0.1,
                                              extras=ex, z_grad=zg if ex else None)
                    launches += 2
                    ref_aux = torch.empty(2, n * l_len, dtype=torch.float64,
                                          device=device) if ex else None
                    tgt64 = target.double() if target.is_floating_point() else target
                    ref_loss, ref_lse, ref_s = cpu.ce_strided_fwd(
                        x.double(), tgt64, label_smoothing=0.1, extras=ex, aux_out=ref_aux)
                    ref_dx, _ = cpu.ce_strided_bwd(x.double(), tgt64, ref_lse, ref_s,
                                                   dloss.double(), label_smoothing=0.1,
                                                   extras=ex, z_grad=zg.double() if ex else None)
                    dev.sync()
                    # the gradient against the upstream's scale: with one class it is 0
                    # (p = 1), and fp32's rounding of 0 is no relative error
                    errs = [_rel_err(loss, ref_loss),
                            _rel_err(dx, ref_dx, float(dloss.abs().max()))]
                    if ex:
                        errs.append(_rel_err(aux[0], ref_aux[0]))
                    ok = all(e <= TOL[dt] for e in errs)
                    failures += not ok
                    if not ok:
                        kind = "probabilities" if target.is_floating_point() else "indices"
                        print(f"  FAIL odd strided launch {dt} {n}x{c}x{l_len} {kind} "
                              f"extras {ex is not None}: errors {errs}")
    return failures, launches


# ----------------------------------------------------------------------------------------
# 2. Timing


def _bench(do_bench, fn, grad_to_none=None):
    fn()  # first call: compiles (Triton JIT, torch.compile) outside the timed region
    fn()
    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth(torch, do_bench, device, nbytes=1 << 30):
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = _bench(do_bench, lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def _impls(torch, F, fusedce, use_compile, fused_kwargs):
    """name -> (loss function of (x, target), byte model of its forward+backward)."""
    kw = fused_kwargs
    impls = {
        "fusedce": (lambda x, t: fusedce.cross_entropy(x, t, **kw), "fwd_bwd"),
        "fusedce-inplace": (
            lambda x, t: fusedce.cross_entropy(x, t, inplace_backward=True, **kw),
            "fwd_bwd_inplace"),
        "eager": (lambda x, t: F.cross_entropy(x, t), "fwd_bwd"),
    }
    if use_compile:
        compiled = torch.compile(lambda x, t: F.cross_entropy(x, t), dynamic=False)
        impls["torch.compile"] = (compiled, "fwd_bwd")
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        # Liger writes the gradient over the logits during the forward: in-place traffic
        impls["liger"] = (LigerCrossEntropyLoss(reduction="mean"), "fwd_bwd_inplace")
    except Exception as e:  # not installed, or an incompatible version
        print(f"  (Liger-Kernel not timed: {type(e).__name__}: {e})")
    return impls


def time_table(torch, F, fusedce, do_bench, ce_bytes, dev, tokens, dtypes, use_compile):
    device = dev.device
    copy_bps = copy_bandwidth(torch, do_bench, device, 1 << (24 if dev.dry_run else 30))
    print(f"\ndevice-to-device copy: {copy_bps / 1e9:.0f} GB/s (read + write)")
    impls = _impls(torch, F, fusedce, use_compile, dev.fused_kwargs)
    rows = []
    for dt in dtypes:
        dtype = _dtype(dt)
        for n in tokens:
            gen = torch.Generator(device=device).manual_seed(n)
            base = torch.randn(n, V, generator=gen, device=device).to(dtype)
            target = torch.randint(0, V, (n,), generator=gen, device=device)
            for name, (fn, model) in impls.items():
                for pass_ in ("fwd", "fwd_bwd"):
                    if pass_ == "fwd" and name == "fusedce-inplace":
                        continue  # its forward is the gradient pass too: only fwd+bwd
                    # a fresh leaf per case: in-place impls overwrite their logits
                    x = base.clone().requires_grad_(True)
                    if pass_ == "fwd":
                        call = lambda fn=fn, x=x, t=target: fn(x, t)  # noqa: E731
                    else:
                        call = lambda fn=fn, x=x, t=target: fn(x, t).backward()  # noqa: E731
                    t0 = time.perf_counter()
                    try:
                        ms = _bench(do_bench, call, grad_to_none=[x])
                        x.grad = None
                        peak = dev.peak_extra_mib(call)
                        x.grad = None
                    except Exception as e:
                        print(f"  {name} {pass_} {dt} N={n}: {type(e).__name__}: {e}")
                        continue
                    bytes_ = ce_bytes(n, V, dtype, "fwd" if pass_ == "fwd" else model)
                    rows.append({
                        "dtype": dt, "tokens": n, "vocab": V, "pass": pass_, "impl": name,
                        "ms": ms, "byte_model": "fwd" if pass_ == "fwd" else model,
                        "bytes": bytes_, "gbps": bytes_ / (ms * 1e-3) / 1e9,
                        "pct_copy": 100 * bytes_ / (ms * 1e-3) / copy_bps,
                        "copy_gbps": copy_bps / 1e9, "peak_extra_mib": peak,
                        "setup_s": time.perf_counter() - t0,
                    })
                    del x
            del base
            dev.empty_cache()
    # ratios within the run: how many times faster fusedce is than each peer
    for r in rows:
        for peer in ("eager", "torch.compile", "liger"):
            other = [o for o in rows if o["impl"] == peer and o["dtype"] == r["dtype"]
                     and o["tokens"] == r["tokens"] and o["pass"] == r["pass"]]
            r[f"x_vs_{peer}"] = other[0]["ms"] / r["ms"] if other else None
    return rows, copy_bps


def print_table(rows):
    head = (f"{'dtype':<5} {'N':>6} {'pass':<7} {'impl':<16} {'ms':>8} {'GB/s':>7} "
            f"{'%copy':>6} {'model':<15} {'x eager':>8} {'x compile':>9} {'x liger':>8} "
            f"{'peak+MiB':>9}")
    print("\n" + head + "\n" + "-" * len(head))

    def ratio(v):
        return f"{v:.2f}" if v is not None else "-"

    for r in rows:
        print(f"{r['dtype']:<5} {r['tokens']:>6} {r['pass']:<7} {r['impl']:<16} "
              f"{r['ms']:>8.3f} {r['gbps']:>7.0f} {r['pct_copy']:>6.1f} {r['byte_model']:<15} "
              f"{ratio(r['x_vs_eager']):>8} {ratio(r['x_vs_torch.compile']):>9} "
              f"{ratio(r['x_vs_liger']):>8} {r['peak_extra_mib']:>9.0f}")


# ----------------------------------------------------------------------------------------
# 3. Launch-parameter sweep of the row kernels (issue 8)


def _sweep_case(torch, do_bench, ce_bytes, ce, device, dt, n, configs, default_choice):
    """All launch choices for one (dtype, N): rows of the sweep table."""
    dtype = _dtype(dt)
    gen = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(n, V, generator=gen, device=device).to(dtype)
    target = torch.randint(0, V, (n,), generator=gen, device=device)
    dloss = torch.full((1,), 1.0 / n, device=device).expand(n)
    scale = torch.full((1,), 1.0 / n, device=device)
    dx = torch.empty_like(x)
    x_inplace = x.clone()  # overwritten by its gradient at every call: still finite logits
    _, lse = ce.ce_fwd(x, target)
    bwd_bytes = ce_bytes(n, V, dtype, "fwd_bwd") - ce_bytes(n, V, dtype, "fwd")
    kernels = {
        "fwd": (lambda: ce.ce_fwd(x, target), ce_bytes(n, V, dtype, "fwd")),
        "bwd": (lambda: ce.ce_bwd(x, target, lse, dloss, dx=dx), bwd_bytes),
        "fwd_inplace": (lambda: ce.ce_fwd(x_inplace, target, grad_scale=scale),
                        ce_bytes(n, V, dtype, "fwd_bwd_inplace")),
    }
    rows = []
    for block, nw, v in configs:
        ce.launch_config = lambda dtype_, n_cols, c=(block, nw, v): c
        for kname, (fn, bytes_) in kernels.items():
            try:
                ms = _bench(do_bench, fn)
            except Exception as e:  # e.g. out of registers or shared memory
                print(f"  {dt} N={n} {kname} BLOCK={block} warps={nw} VEC={v}: "
                      f"{type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append({
                "dtype": dt, "tokens": n, "kernel": kname, "block": block, "num_warps": nw,
                "vec": v, "aligned": v > 1, "default": (block, nw, v) == default_choice,
                "ms": ms, "gbps": bytes_ / (ms * 1e-3) / 1e9,
            })
            print(f"  {dt} N={n:>6} {kname:<12} BLOCK={block:>5} warps={nw:>2} VEC={v} "
                  f"{ms:8.3f} ms {rows[-1]['gbps']:7.0f} GB/s", flush=True)
    return rows


def sweep(torch, do_bench, ce_bytes, dev, blocks, warps, tokens=TOKENS,
          dtypes=("bf16", "fp32")):
    """Times ``ce_fwd``, ``ce_bwd`` and the in-place ``ce_fwd`` with ``launch_config``
    replaced by each choice of BLOCK_SIZE x num_warps, and the default choice with the
    aligned body off (VEC = 1: the plain loop)."""
    from fusedce.kernels import cross_entropy as ce

    default = ce.launch_config
    rows = []
    try:
        for dt in dtypes:
            d_block, d_warps, vec = default(_dtype(dt), V)
            configs = [(b, w, vec) for b in blocks for w in warps
                       if 2 <= b // (32 * w) <= 128] + [(d_block, d_warps, 1)]
            for n in tokens:
                rows += _sweep_case(torch, do_bench, ce_bytes, ce, dev.device, dt, n, configs,
                                    (d_block, d_warps, vec))
                dev.empty_cache()
    finally:
        ce.launch_config = default
    print("\nbest launch choice per case (default marked *):")
    for key in sorted({(r["dtype"], r["tokens"], r["kernel"]) for r in rows}):
        case = [r for r in rows if (r["dtype"], r["tokens"], r["kernel"]) == key]
        best = min(case, key=lambda r: r["ms"])
        dflt = [r for r in case if r["default"]]
        tail = (f"; default {dflt[0]['ms']:.3f} ms ({dflt[0]['ms'] / best['ms']:.2f}x the best)"
                if dflt else "")
        print(f"  {key[0]} N={key[1]:>6} {key[2]:<12} BLOCK={best['block']} "
              f"warps={best['num_warps']} VEC={best['vec']}"
              f"{'*' if best['default'] else ''}: {best['ms']:.3f} ms {best['gbps']:.0f} GB/s"
              + tail)
    return rows


# ----------------------------------------------------------------------------------------


def check_and_time_linear(torch, F, fusedce, dev, dry_run):
    """Issue 5 on the GPU: correctness of ``fusedce.linear_cross_entropy`` against the
    unfused float64 reference, then ``bench.linear``'s cases (with Liger's when importable).
    Returns ``(failures, rows)``."""
    import importlib.util

    from bench import linear as lin

    device = dev.device
    failures = 0
    print(f"\nfused linear + cross-entropy against float64 on {dev.name}")
    for dt in ("fp32", "bf16"):
        tokens, hidden, vocab = (24, 40, 1_001) if dry_run else (1_000, 768, V)
        x, w, target = lin.make_inputs(tokens, hidden, vocab, dt, device)
        target[::7] = -100
        x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
        ref = F.cross_entropy(F.linear(x64, w64), target, label_smoothing=0.1)
        ref_dx, ref_dw = torch.autograd.grad(ref, (x64, w64))
        loss = fusedce.linear_cross_entropy(x, w, target, label_smoothing=0.1,
                                            **dev.fused_kwargs)
        dx, dw = torch.autograd.grad(loss, (x, w))
        dev.sync()
        errs = {"loss": _rel_err(loss, ref), "d hidden": _rel_err(dx, ref_dx),
                "d weight": _rel_err(dw, ref_dw)}
        ok = all(e <= TOL[dt] for e in errs.values())
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {dt:<4} {tokens}x{hidden}->{vocab} "
              + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    cases = list(lin.CASES)
    if not dry_run and importlib.util.find_spec("liger_kernel") is not None:
        cases.append("liger")
    else:
        print("  liger: not importable (or a dry run): left out of the timing")
    shape = dict(tokens=64, hidden=32, vocab=1_001, dtype="fp32", repeats=1, memory=False) \
        if dry_run else dict(tokens=8_192, hidden=768, vocab=V, dtype="bf16", repeats=5)
    rows = lin.run(device=str(device), cases=cases, **shape)
    print(lin.format_table(rows))
    times = {r["case"]: r for r in rows}
    if "liger" in times:
        for key, what in (("time_ms", "time"), ("extra_mib", "peak memory")):
            a, b = times["fusedce"][key], times["liger"][key]
            if a is not None and b:
                print(f"  fusedce / liger {what}: {a / b:.2f} (target <= 1.00)")
    return failures, rows


def _write_csv(path, rows, extra):
    if not rows:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(extra) + list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**extra, **r})
    print(f"wrote {path}")


def main(argv=None):
    global V
    args = _parse_args(argv)
    V = args.vocab
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            _fail("--dry-run needs TRITON_INTERPRET=1 before Triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        _fail("PyTorch is not installed")
    if not args.dry_run and not torch.cuda.is_available():
        _fail("no CUDA device (torch.cuda.is_available() is False): this check needs an "
              "NVIDIA GPU; the CPU tests are `pytest`, a CPU run of this script --dry-run")
    try:
        import triton
        from triton.testing import do_bench
    except ImportError:
        _fail("Triton is not installed (pip install triton)")
    import fusedce
    from bench.byte_model import ce_bytes

    DTYPES.update(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
    dev = _Device(torch, args.dry_run)
    if args.dry_run:
        do_bench = _cpu_do_bench
    gpu = dev.name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")

    extra = {"device": gpu, "torch": torch.__version__, "triton": triton.__version__,
             "date": datetime.date.today().isoformat()}
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__}")
    start = time.perf_counter()
    failures = 0
    if args.sanitize or args.dry_run:
        failures += check_odd_launches(torch, dev)
    if args.sanitize:
        return 1 if failures else 0
    if not args.sweep_only:
        failures += check_correctness(torch, F, fusedce, dev, 8 if args.dry_run else None)
        failures += check_strided(torch, F, fusedce, dev, 300 if args.dry_run else None)
        print(f"correctness: {failures} failure(s)")
        tokens = [int(t) for t in args.tokens.split(",")]
        dtypes = args.dtypes.split(",")
        rows, _ = time_table(torch, F, fusedce, do_bench, ce_bytes, dev, tokens, dtypes,
                             not args.no_compile)
        print_table(rows)
        _write_csv(os.path.join(args.out, f"gpu_check_{slug}.csv"), rows, extra)
        rows = time_few_rows(torch, F, fusedce, do_bench, dev,
                             *(((V,), (1, 2)) if args.dry_run else ()))
        _write_csv(os.path.join(args.out, f"gpu_few_rows_{slug}.csv"), rows, extra)
        rows = time_extras(torch, fusedce, do_bench, dev,
                           *((4, (V,)) if args.dry_run else ()))
        _write_csv(os.path.join(args.out, f"gpu_extras_{slug}.csv"), rows, extra)
        if not args.no_linear:
            lin_failures, rows = check_and_time_linear(torch, F, fusedce, dev, args.dry_run)
            failures += lin_failures
            _write_csv(os.path.join(args.out, f"gpu_linear_{slug}.csv"), rows, extra)
    if args.sweep or args.sweep_only:
        rows = sweep(torch, do_bench, ce_bytes, dev,
                     [int(b) for b in args.blocks.split(",")],
                     [int(w) for w in args.warps.split(",")],
                     tokens=[int(t) for t in args.tokens.split(",")])
        _write_csv(os.path.join(args.out, f"gpu_sweep_{slug}.csv"), rows, extra)
    print(f"\ndone in {time.perf_counter() - start:.0f} s"
          + (f"; {failures} correctness failure(s)" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
