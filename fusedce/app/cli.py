"""The ``fusedce`` command (also ``python -m fusedce``).

    fusedce [--version] [-h]
    fusedce demo [TEXT ...] [--device D] [--size S] [--backend B] [--tokenizer-file F] ...
    fusedce train [--steps N] [--loss fusedce|torch|both] [--inplace] [--text-file F] [--out DIR]

With no sub-command (``fusedce``, or only options: ``fusedce --size tiny``) it runs the demo
on its default texts. A first word that is not a sub-command is an error, not a text to
score: ``fusedce trian`` must not quietly run the demo; texts go after ``demo``.

Bad input ends with one line on stderr and exit status 2, without a traceback: argparse's
usage and message for what it checks (types, choices), ``fusedce: error: ...`` for what is
found later (no CUDA, a file that cannot be read or written, a missing optional dependency),
always before the long work starts where it can be known then.
"""

import argparse
import difflib
import importlib.util
import os
import re
import sys

import fusedce

from . import demo, train
from .model import UsageError
from .tokenizer import TokenizerUnavailable

COMMANDS = {
    "demo": (demo, "GPT-2 tokens in, loss out, step by step (the default)"),
    "train": (train, "train a small GPT-2-style model and plot its loss curve"),
}
_TOP_LEVEL = ("-h", "--help", "--version")


def plain(text):
    """``text`` (a docstring) without reST markup: ``code`` -> code."""
    return re.sub(r"``(.+?)``", r"\1", text or "")


def _parser():
    parser = argparse.ArgumentParser(
        prog="fusedce",
        description="Fused cross-entropy for language-model training: a demo "
        "on GPT-2 tokens and a small training loop.",
        epilog="With no sub-command, or only options, fusedce runs the demo on its default "
        "texts; to score your own: fusedce demo TEXT ...",
    )
    parser.add_argument(
        "--version", action="version", version=f"fusedce {fusedce.__version__}",
        help="print fusedce's version and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,train}")
    parser.commands = {}  # each sub-command's parser, whose usage its own errors show
    for name, (module, help_) in COMMANDS.items():
        parser.commands[name] = sub.add_parser(
            name, help=help_, description=plain(module.__doc__),
            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser.commands[name])
    return parser


def _explicit(argv, parser):
    """``(argv with its sub-command first, implicit)``; an unknown first word is an error."""
    if not argv or (argv[0].startswith("-") and argv[0] not in _TOP_LEVEL):
        return ["demo", *argv], True
    if argv[0] in COMMANDS or argv[0] in _TOP_LEVEL:
        return argv, False
    close = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    parser.error(
        f"unknown command {argv[0]!r}: {hint}choose from {', '.join(COMMANDS)} "
        "(to score your own texts: fusedce demo TEXT ...)"
    )


def _check(args):
    """What the parser cannot check: the device exists here, triton is there if asked for."""
    args.device = demo.check_device(args.device)
    if args.backend == "triton" and importlib.util.find_spec("triton") is None:
        raise UsageError("--backend triton needs the triton package (pip install triton, "
                         "Linux); use --backend torch")


def _interpret_triton_on_cpu(args):
    """``--backend triton`` on the CPU runs Triton's interpreter, which must be switched on
    before triton is first imported."""
    on_cpu = (args.device or demo.default_device()).startswith("cpu")
    kernels = getattr(args, "backend", None) == "triton" and getattr(args, "loss", "") != "torch"
    if kernels and on_cpu and "triton" not in sys.modules:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "(--backend triton on the CPU: setting TRITON_INTERPRET=1, Triton's "
                "interpreter; slow, for checking, not for speed)\n"
            )
            os.environ["TRITON_INTERPRET"] = "1"


def _error(message):
    """One line on stderr, status 2."""
    print("fusedce: error: " + " ".join(str(message).split()), file=sys.stderr)
    return 2


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    argv, implicit = _explicit(argv, parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the sub-command's usage (parse_args would show the top level's)
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if implicit and args.texts:
        parser.error("texts to score need the sub-command: fusedce demo TEXT ...")
    try:
        _check(args)
        _interpret_triton_on_cpu(args)
        COMMANDS[args.command][0].main(args)
    except (UsageError, TokenizerUnavailable) as err:
        return _error(err)
    except KeyboardInterrupt:
        print("fusedce: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
