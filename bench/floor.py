"""``python -m bench.floor``: the large case beside what no forward + backward can beat.

A cross-entropy's forward + backward that returns the logits' gradient must read the logits
and write a logits-sized gradient, and that gradient is ``exp(x - lse)`` (less the target's
one-hot) for every logit: one exponential per logit. Two ops of PyTorch measure those costs
on the machine at hand:

- ``copy``: ``g.copy_(x)``, reading the logits and writing a logits-sized buffer: the
  memory traffic of the pass (a separate gradient; ``inplace_backward`` writes over ``x``);
- ``exp``: ``torch.exp(x, out=g)``: the same traffic with PyTorch's exponential, which
  fusedce's CPU path took until 2026-12-07, on every logit;
- ``exp2``: ``torch.exp2(x, out=g)``: PyTorch's base-2 exponential, 2-4x cheaper on the
  CPUs measured, which the CPU path now takes of one fused multiply-add per logit,
  ``exp(x - m) = exp2(x log2 e - m log2 e)`` (``fusedce.cpu.chunks.exp_argument``; its
  precision in docs/benchmarks.md).

They run interleaved with forward + backward of ``fusedce``, ``compile`` and ``eager`` (as in
``python -m bench``; the logits restored untimed before every call) on one machine state, in
one process, on as many threads as PyTorch's own ops use. Medians; ``x compile`` is
``torch.compile``'s median over the row's. fp32 logits ~ N(0, 2), GPT-2's vocabulary.

    python -m bench.floor                        # 2,048 x 50,257
    python -m bench.floor --tokens 4096 --repeats 15
"""

import argparse
import functools

import torch

from bench.ce import device_name, time_cases
from bench.output import add_shape_arguments

LOSSES = ("fusedce", "compile", "eager")
PASSES = {
    "copy": lambda x, g: g.copy_(x),
    "exp": lambda x, g: torch.exp(x, out=g),
    "exp2": lambda x, g: torch.exp2(x, out=g),
}


def run(tokens=2048, vocab=50_257, repeats=9, warmup=1, losses=LOSSES):
    """``{case: median seconds}``: the passes, then the losses' forward + backward."""
    out = torch.empty(tokens, vocab).fill_(0.0)  # resident, as a reused gradient buffer is
    passes = {name: functools.partial(fn, g=out) for name, fn in PASSES.items()}
    times, _ = time_cases(losses, "fwd_bwd", tokens, vocab, repeats=repeats, warmup=warmup,
                          others=passes)
    return times


def report(times, tokens, vocab, repeats):
    """A Markdown table of ``times`` and what 4x ``torch.compile`` would need."""
    lines = [f"{device_name('cpu')}; torch {torch.__version__}; {tokens} x {vocab} fp32; "
             f"medians of {repeats} interleaved rounds",
             "", "| case | what it does | ms | x compile |", "|---|---|---|---|"]
    what = {"copy": "read x, write g", "exp": "g = exp(x)", "exp2": "g = exp2(x)",
            "fusedce": "fwd+bwd", "compile": "fwd+bwd", "eager": "fwd+bwd"}
    compiled = times.get("compile")
    for case, sec in times.items():
        ratio = f"{compiled / sec:.2f}" if compiled else ""
        lines.append(f"| {case} | {what[case]} | {sec * 1e3:.2f} | {ratio} |")
    if compiled:
        lines += ["", f"4x torch.compile means at most {compiled / 4 * 1e3:.1f} ms a step; "
                      f"exp over the logits alone takes {times['exp'] * 1e3:.1f} ms, "
                      f"exp2 {times['exp2'] * 1e3:.1f} ms"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p, repeats=9)
    args = p.parse_args(argv)
    times = run(args.tokens, args.vocab, args.repeats)
    print(report(times, args.tokens, args.vocab, args.repeats))


if __name__ == "__main__":
    main()
