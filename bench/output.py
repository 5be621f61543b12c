"""Where benchmark results go, checked before a run starts: the default folder is the
untracked ``bench/out/``, so a run never overwrites ``bench/results/`` (the figures the README
cites) unless that folder is named with ``--out``."""

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
