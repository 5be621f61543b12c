"""``python -m bench.script_ablation``: what running the CPU path's chunk loops as
TorchScript functions buys, measured in one process.

fusedce's CPU path splits the rows across worker threads, each looping over cache-sized
chunks (``fusedce.chunks.fwd_chunks``, ``_bwd_chunks``). As Python, such a loop
takes the GIL back between every pair of short ops, and the workers contend for it; as a
script (the default) it runs without the GIL. This times both, interleaved round by round on the
same inputs (medians; the ratio is within the run), for the default and the in-place mode
in fp32 and bf16, and writes ``script_ablation.md`` into ``--out`` (default ``bench/out/``,
untracked; ``--out bench/results`` replaces the tracked report, on purpose only).
"""

import argparse
import datetime
import os
import statistics
import time

import torch

import fusedce
from bench.ce import device_name, make_inputs, step
from bench.output import add_out_argument, add_shape_arguments, parse_checked
from fusedce.cpu import chunks

CASES = {"fusedce": {}, "fusedce_inplace": {"inplace_backward": True}}


def _loops(scripted):
    """The chunk loops that ``ce_fwd`` and ``ce_bwd`` will use: scripted, or the same
    functions as Python."""
    for fn in (chunks.fwd_chunks, chunks.bwd_chunks):
        if scripted:
            chunks._SCRIPTED.pop(fn, None)
            if not isinstance(chunks.script(fn), torch.jit.ScriptFunction):
                raise RuntimeError("TorchScript is unavailable or off (FUSEDCE_SCRIPT=0)")
        else:
            chunks._SCRIPTED[fn] = fn


def run(tokens=2048, vocab=50_257, dtypes=("fp32", "bf16"), repeats=9):
    rows = []
    for dtype in dtypes:
        pristine, target = make_inputs(tokens, vocab, dtype)
        step.target = target
        work = torch.empty_like(pristine)
        times = {(case, s): [] for case in CASES for s in (True, False)}
        for r in range(repeats + 1):  # round 0: warm-up
            for case, kwargs in CASES.items():
                for scripted in (True, False):
                    _loops(scripted)
                    fn = lambda x, t, kw=kwargs: fusedce.cross_entropy(x, t, **kw)
                    x = work.detach()
                    x.copy_(pristine)
                    start = time.perf_counter()
                    keep = step(fn, "fwd_bwd", x)
                    elapsed = time.perf_counter() - start
                    del keep, x
                    if r:
                        times[case, scripted].append(elapsed)
        for case in CASES:
            script = statistics.median(times[case, True]) * 1e3
            python = statistics.median(times[case, False]) * 1e3
            rows.append((dtype, case, script, python, python / script))
    _loops(True)
    return rows


def report(rows, tokens, vocab, repeats):
    lines = [
        "# The CPU path's chunk loops: TorchScript against Python",
        "",
        f"- machine: {device_name('cpu')}; torch {torch.__version__}; "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        f"- command: `python -m bench.script_ablation --tokens {tokens} --repeats {repeats}`",
        f"- {tokens:,} x {vocab:,} logits, forward+backward; medians of {repeats} interleaved "
        "rounds in one process",
        "",
        "| dtype | case | loops as scripts (ms) | loops as Python (ms) | Python / script |",
        "|---|---|---|---|---|",
    ]
    for dtype, case, script, python, ratio in rows:
        lines.append(f"| {dtype} | {case} | {script:.1f} | {python:.1f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.script_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p, repeats=9)
    add_out_argument(p, "script_ablation.md")
    args = parse_checked(p, argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = run(args.tokens, args.vocab, repeats=args.repeats)
    text = report(rows, args.tokens, args.vocab, args.repeats)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "script_ablation.md")
    with open(path, "w") as f:
        f.write(text)
    print(text + f"wrote {path}")


if __name__ == "__main__":
    main()
