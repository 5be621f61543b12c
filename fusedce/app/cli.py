"""The ``fusedce`` command (also ``python -m fusedce``).

    fusedce demo [TEXT ...] [--device D] [--size S] [--backend B] [--tokenizer-file F]
    fusedce train [--steps N] [--loss fusedce|torch] [--inplace] [--text-file F] [--out DIR]

With no sub-command it runs the demo.
"""

import argparse
import os
import sys

from . import demo, train
from .tokenizer import TokenizerUnavailable


def _parser():
    parser = argparse.ArgumentParser(
        prog="fusedce",
        description="Fused cross-entropy for language-model training: a demo "
        "on GPT-2 tokens and a small training loop.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,train}")
    for module, name, help_ in (
        (demo, "demo", "GPT-2 tokens in, loss out, step by step (the default)"),
        (train, "train", "train a small GPT-2-style model and plot its loss curve"),
    ):
        module.add_arguments(sub.add_parser(
            name, help=help_, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def _interpret_triton_on_cpu(args):
    """``--backend triton`` on the CPU runs Triton's interpreter, which must be switched on
    before triton is first imported."""
    on_cpu = (args.device or demo.default_device()).startswith("cpu")
    if getattr(args, "backend", None) == "triton" and on_cpu and "triton" not in sys.modules:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "(--backend triton on the CPU: setting TRITON_INTERPRET=1, Triton's "
                "interpreter; slow, for checking, not for speed)\n"
            )
            os.environ["TRITON_INTERPRET"] = "1"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("demo", "train", "-h", "--help"):
        argv = ["demo", *argv]
    args = _parser().parse_args(argv)
    _interpret_triton_on_cpu(args)
    try:
        (demo.main if args.command == "demo" else train.main)(args)
    except TokenizerUnavailable as err:
        print(f"fusedce {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
