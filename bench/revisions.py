"""This checkout's ``fusedce.cross_entropy`` (or ``linear_cross_entropy``) against another git
revision's, in one process.

The other revision is extracted with ``git archive`` and imported under another package name
(``fusedce_<rev>``), so both run interleaved on the same machine state: the ratio of their
medians is what a change did to the speed, free of the drift between two runs.

    python -m bench.revisions HEAD~1                 # small calls and GPT-2's large one
    python -m bench.revisions main --shapes 1x50257,8x1000 --repeats 200
    python -m bench.revisions HEAD~1 --loss linear   # ROWSxCLASSESxHIDDEN shapes
    python -m bench.revisions HEAD~1 --after-matmul 512  # a parallel op before each call

Forward + backward (the default mode, then ``inplace_backward=True``, then under
saved-tensor hooks, where the gradient is computed in the backward from the saved lse, as
with ``torch.utils.checkpoint``; for the linear loss 'mean', then 'none' with an upstream
gradient of ones), and the forward alone under ``no_grad``; CPU, fp32.
"""

import argparse
import functools
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fusedce
from bench.output import positive_int

ROOT = Path(__file__).resolve().parent.parent
SHAPES = "1x50257,6x50257,64x50257,8x1000,512x32,4096x10,2048x50257"
LINEAR_SHAPES = "256x50257x64,1024x50257x128"


def load_revision(rev):
    """``fusedce`` as it is at ``rev``, imported as the package ``fusedce_<rev>``."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    name = f"fusedce_{sha}"
    tmp = Path(tempfile.mkdtemp(prefix="fusedce-rev-"))
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    pkg = tmp / name
    shutil.move(str(tmp / "fusedce"), pkg)
    if (tmp / "kernels").is_dir():  # older layout: kernels/ installed as fusedce.kernels
        shutil.move(str(tmp / "kernels"), pkg / "kernels")
    # its torch.library ops under their own namespace: defined again as "fusedce::...",
    # they would replace this checkout's in the process (torch.compile would then run the
    # other revision, through ops whose first definition's library was destroyed)
    for source in pkg.rglob("*.py"):
        text = source.read_text()
        if '"fusedce::' in text:
            source.write_text(text.replace('"fusedce::', f'"{name}::'))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(name), sha


def step(module, x, target, no_grad=False, hooks=False, **kwargs):
    if no_grad:  # evaluation: the loss alone
        with torch.no_grad():
            module.cross_entropy(x, target, **kwargs)
        return
    # in place overwrites the logits: a fresh copy per call (the same cost for both)
    x = (x.clone() if kwargs.get("inplace_backward") else x.detach()).requires_grad_()
    if hooks:  # the backward-time route: saved tensors pass through the hooks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = module.cross_entropy(x, target, **kwargs)
        loss.backward()
        return
    module.cross_entropy(x, target, **kwargs).backward()


def linear_step(module, x, w, target, no_grad=False, **kwargs):
    if no_grad:
        with torch.no_grad():
            module.linear_cross_entropy(x, w, target, **kwargs)
        return
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = module.linear_cross_entropy(x, w, target, **kwargs)
    loss.backward(torch.ones_like(loss))


def median_us(fn, repeats, before=None):
    """Median microseconds of ``fn()``; ``before()``, untimed, ahead of each call."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare against (e.g. HEAD~1, main)")
    parser.add_argument("--loss", choices=("cross_entropy", "linear"), default="cross_entropy",
                        help="the loss to time (default: %(default)s)")
    parser.add_argument("--shapes", default=None,
                        help=f"ROWSxCLASSES,... (default: {SHAPES}); for --loss linear "
                             f"ROWSxCLASSESxHIDDEN,... (default: {LINEAR_SHAPES})")
    parser.add_argument("--repeats", type=positive_int, default=50,
                        help="timed calls per round (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="alternating rounds of each version (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: PyTorch's choice)")
    parser.add_argument("--after-matmul", type=positive_int, default=None, metavar="N",
                        help="an untimed N x N torch.mm before each call, as a model's last "
                             "layer runs before its loss (PyTorch's OpenMP threads are "
                             "then still spinning); default: none")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    other, sha = load_revision(args.rev)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; "
          f"medians over {args.rounds} x {args.repeats} calls; ratio = this / {sha}")
    print(f"{'shape':>14} {'mode':>8} {'this us':>10} {sha + ' us':>12} {'ratio':>7}")
    linear = args.loss == "linear"
    modes = ((("default", {}), ("none", {"reduction": "none"}), ("no_grad", {"no_grad": True}))
             if linear else (("default", {}), ("inplace", {"inplace_backward": True}),
                             ("hooks", {"hooks": True}), ("no_grad", {"no_grad": True})))
    for shape in (args.shapes or (LINEAR_SHAPES if linear else SHAPES)).split(","):
        dims = [int(v) for v in shape.split("x")]
        n, c = dims[:2]
        gen = torch.Generator().manual_seed(0)
        target = torch.randint(0, c, (n,), generator=gen)
        if linear:
            x = torch.randn(n, dims[2], generator=gen)
            w = torch.randn(c, dims[2], generator=gen) * dims[2] ** -0.5
            run = functools.partial(linear_step, x=x, w=w, target=target)
        else:
            x = torch.randn(n, c, generator=gen)
            run = functools.partial(step, x=x, target=target)
        repeats = max(3, args.repeats // max(1, n * c // (1 << 20)))
        before = None
        if args.after_matmul:
            a = torch.randn(args.after_matmul, args.after_matmul, generator=gen)
            before = functools.partial(torch.mm, a, a)
        for mode, kwargs in modes:
            runs = {"this": [], "other": []}
            for module in (fusedce, other):
                run(module, **kwargs)  # warm-up: pools, scripts, buffers
            for _ in range(args.rounds):
                for module, key in ((fusedce, "this"), (other, "other")):
                    runs[key].append(median_us(
                        lambda m=module, kw=kwargs, r=run: r(m, **kw), repeats, before))
            this, that = statistics.median(runs["this"]), statistics.median(runs["other"])
            print(f"{shape:>14} {mode:>8} {this:>10.0f} {that:>12.0f} {this / that:>7.3f}")


if __name__ == "__main__":
    main()
