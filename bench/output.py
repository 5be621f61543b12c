"""Where benchmark results go, checked before a run starts: the default folder is the
untracked ``bench/out/``, so a run never overwrites ``bench/results/`` (the figures the README
cites) unless that folder is named with ``--out``."""

import argparse
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# Untracked (.gitignore): a run never overwrites bench/results/, the figures the README cites,
# unless that folder is named with --out.
DEFAULT_OUT = os.path.join(HERE, "out")


def check_out_dir(path, option="--out"):
    """An error message if files cannot be written into ``path`` (made if need be), else None;
    creates nothing (a temporary file in the nearest existing folder is the test)."""
    import tempfile

    existing = os.path.abspath(path)
    if os.path.exists(existing) and not os.path.isdir(existing):
        return f"{option} {path}: is a file, not a folder"
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{option} {path}: {existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{option} {path}: cannot write in {existing} ({err.strerror})"
    return None


def missing_extras(modules=("tqdm", "matplotlib")):
    """The modules of the "bench" extra that cannot be imported."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def positive_int(text):
    """An argparse ``type``: an integer of at least 1 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def device(text):
    """An argparse ``type``: a device this machine has (``cpu``, ``cuda``, ``cuda:N``), a
    usage error otherwise (a CPU build of torch asserted deep inside the first case)."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu or cuda[:N])") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA "
                                             f"device(s) (use --device cpu)")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda[:N]")
    return text


def add_shape_arguments(parser, repeats):
    """``--tokens``, ``--vocab`` and ``--repeats`` of a benchmark of one logits shape, GPT-2's
    2,048 x 50,257 by default."""
    parser.add_argument("--tokens", type=positive_int, default=2048,
                        help="rows of the logits (default: %(default)s)")
    parser.add_argument("--vocab", type=positive_int, default=50_257,
                        help="vocabulary size, the logits' width (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=repeats,
                        help="timed rounds after a warm-up (default: %(default)s)")


def add_out_argument(parser, files):
    """The ``--out DIR`` option of a benchmark that writes ``files`` (a phrase)."""
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for {files} (default: bench/out/, untracked)")


def parse_checked(parser, argv):
    """``parser.parse_args(argv)``, with a usage error before any work if ``--out`` cannot
    be written."""
    args = parser.parse_args(argv)
    problem = check_out_dir(args.out)
    if problem:
        parser.error(problem)
    return args
