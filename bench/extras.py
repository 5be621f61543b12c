"""``python -m bench.extras``: what each loss extra costs, as ratios of medians taken in the
same process (interleaved call by call, ``bench.grid.time_pair``).

For each extra of ``fusedce.cross_entropy`` (``logit_scale``, ``softcap``, the z-loss
``lse_square_scale``, ``return_aux``, and all of them at once) it times forward + backward
('mean') of the language-model shape and prints two ratios:

- against fusedce's plain loss on the same logits (the option's own cost);
- against the same loss written in PyTorch (``softcap * tanh(x * scale / softcap)``, then
  ``F.cross_entropy`` plus ``lse_square_scale * logsumexp**2``, and for the aux outputs
  ``logsumexp``, the entropy and the argmax), what a user writes without fusedce.

    python -m bench.extras                             # 2,048 x 50,257, fp32 and bf16
    python -m bench.extras --tokens 512 --vocab 128256 --dtypes bf16
    python -m bench.extras --targets probabilities     # class probabilities (the strided path)
"""

import argparse
import csv
import os
import sys

import torch
import torch.nn.functional as F

import fusedce
from bench.grid import DTYPES, time_pair
from bench.output import add_out_argument, parse_checked

OPTIONS = {
    "logit_scale": dict(logit_scale=0.5),
    "softcap": dict(softcap=30.0),
    "z_loss": dict(lse_square_scale=1e-4),
    "return_aux": dict(return_aux=True),
    "all": dict(logit_scale=0.5, softcap=30.0, lse_square_scale=1e-4, return_aux=True),
}


def pytorch_loss(x, target, logit_scale=1.0, softcap=None, lse_square_scale=0.0,
                 return_aux=False):
    """The loss with the extras in plain PyTorch ops: the reference a user would write."""
    z = x.float() * logit_scale if logit_scale != 1.0 else x.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, target)
    if lse_square_scale or return_aux:
        lse = torch.logsumexp(z, 1)
        if lse_square_scale:
            loss = loss + lse_square_scale * (lse ** 2).mean()
        if return_aux:
            with torch.no_grad():
                logp = z - lse[:, None]
                entropy = -(logp.exp() * logp).sum(1)
                wanted = target.argmax(1) if target.is_floating_point() else target
                accuracy = (z.argmax(1) == wanted).float().mean()
            return loss, lse.detach(), entropy, accuracy
    return loss


def _loss_of(out):
    return out[0] if isinstance(out, tuple) else out


def make_step(fn, x, target, kwargs):
    leaf = x.detach().requires_grad_()

    def step():
        _loss_of(fn(leaf, target, **kwargs)).backward()
        leaf.grad = None
    return step


def run(args):
    gen = torch.Generator().manual_seed(0)
    results = []
    for dname in args.dtypes.split(","):
        x = (torch.randn(args.tokens, args.vocab, generator=gen) * 4).to(DTYPES[dname])
        if args.targets == "probabilities":
            target = torch.softmax(torch.randn(args.tokens, args.vocab, generator=gen), 1)
            target = target.to(x.dtype)
        else:
            target = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
        plain = make_step(fusedce.cross_entropy, x, target, {})
        for name in args.options.split(","):
            kw = OPTIONS[name]
            ours = make_step(fusedce.cross_entropy, x, target, kw)
            t_ours, t_plain = time_pair(ours, plain, args.samples, args.sample_ms / 1e3)
            t_ours2, t_torch = time_pair(ours, make_step(pytorch_loss, x, target, kw),
                                         args.samples, args.sample_ms / 1e3)
            row = dict(dtype=dname, targets=args.targets, option=name, tokens=args.tokens,
                       vocab=args.vocab,
                       fusedce_ms=t_ours * 1e3, plain_ms=t_plain * 1e3,
                       vs_plain=t_ours / t_plain, pytorch_ms=t_torch * 1e3,
                       vs_pytorch=t_ours2 / t_torch)
            results.append(row)
            print(f"{dname} {name:11s} fusedce {t_ours * 1e3:8.1f} ms  plain "
                  f"{t_plain * 1e3:8.1f} ms  ratio {row['vs_plain']:.2f}   pytorch "
                  f"{t_torch * 1e3:8.1f} ms  ratio {row['vs_pytorch']:.2f}", file=sys.stderr,
                  flush=True)
    return results


def table(results):
    out = ["| dtype | targets | option | fusedce ms | / fusedce plain | PyTorch ops ms | "
           "/ PyTorch ops |", "|---|---|---|---|---|---|---|"]
    for r in results:
        out.append(f"| {r['dtype']} | {r['targets']} | {r['option']} | {r['fusedce_ms']:.1f} | "
                   f"{r['vs_plain']:.2f} | {r['pytorch_ms']:.1f} | {r['vs_pytorch']:.2f} |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.extras",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--targets", choices=("indices", "probabilities"), default="indices",
                        help="class indices (default) or class probabilities")
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--sample-ms", type=float, default=200.0)
    add_out_argument(parser, "extras_cpu.csv")
    args = parse_checked(parser, argv)
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    for o in args.options.split(","):
        if o not in OPTIONS:
            parser.error(f"unknown option {o!r}; choose from {', '.join(OPTIONS)}")
    results = run(args)
    print(table(results))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "extras_cpu.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
