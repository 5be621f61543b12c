"""``fusedce train``: train a small GPT-2-style model and write its loss curve.

The text is English found on every machine without a download, the docstrings of a fixed
list of Python standard-library modules (or a UTF-8 file named with ``--text-file``),
tokenized with GPT-2's encoding. Each step takes a batch of random windows of the token
stream and minimises the next-token cross-entropy, computed by ``fusedce.cross_entropy``
(``--loss fusedce``, optionally ``--inplace``) or ``torch.nn.functional.cross_entropy``
(``--loss torch``); ``--loss both`` trains twice from the same seed, the two runs' steps in
turn, and plots both curves.
Writes ``loss.csv`` and ``loss.png`` (matplotlib) into ``--out``.

This is the usual way in: the model returns logits (batch, tokens, vocab) and the loop calls

    loss = fusedce.cross_entropy(logits.view(-1, vocab), targets.view(-1))

where it would have called ``F.cross_entropy``.
"""

import csv
import importlib
import inspect
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import fusedce

from .demo import load_encoding, positive_float, positive_int, seed_int
from .model import SIZES, UsageError, build_model

# Standard-library modules whose docstrings make the default corpus: long, plain English
# prose (about 100k GPT-2 tokens on CPython 3.11), in the same order on every machine.
CORPUS_MODULES = (
    "argparse",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "zipfile",
)
LOSSES = ("fusedce", "torch", "both")


def stdlib_text(modules=CORPUS_MODULES):
    """The docstrings of ``modules`` and of their public classes, functions and methods."""
    with warnings.catch_warnings():  # reading e.g. typing.io's docstring warns
        warnings.simplefilter("ignore", DeprecationWarning)
        parts = _docstrings(modules)
    text = "\n\n".join(p for p in parts if p)
    if len(text) < 10_000:
        raise RuntimeError(
            "the standard library has no docstrings here (python -OO?); "
            "name a text file with --text-file"
        )
    return text


def _docstrings(modules):
    parts = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. a Python built without a module
            continue
        parts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or inspect.ismodule(obj):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            parts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for meth, fn in sorted(vars(obj).items()):
                    if not meth.startswith("_") and callable(fn):
                        parts.append(inspect.getdoc(fn) or "")
    return parts


def load_tokens(text_file=None, tokenizer_file=None, max_tokens=None):
    """The corpus as a 1-D tensor of GPT-2 token ids (the first ``max_tokens`` of them)."""
    text = read_text_file(text_file) if text_file else stdlib_text()
    if max_tokens:  # tokenize no more than needed: ~4 characters a token, with margin
        text = text[: 8 * max_tokens]
    ids = load_encoding(tokenizer_file).encode_ordinary(text)
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def read_text_file(path):
    """The UTF-8 text of ``path``; a file that cannot be read is a UsageError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--text-file {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--text-file {path}: is a folder, not a text file") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"--text-file {path}: not UTF-8 text ({err.reason} at byte "
                         f"{err.start}); convert it to UTF-8") from None
    except OSError as err:
        raise UsageError(f"--text-file {path}: cannot read it ({err.strerror})") from None


def check_text_file(path):
    """Before any work: ``path`` is a file that can be opened (its text is read later)."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--text-file {path}: no such file")
    if p.is_dir():
        raise UsageError(f"--text-file {path}: is a folder, not a text file")
    try:
        with open(p, "rb"):
            pass
    except OSError as err:
        raise UsageError(f"--text-file {path}: cannot read it ({err.strerror})") from None


OUTPUTS = ("loss.csv", "loss.png")


def check_out_dir(out_dir):
    """Before any work: ``loss.csv`` and ``loss.png`` can be written into ``out_dir`` (made
    later if need be); a UsageError otherwise. Creates nothing: a temporary file in the
    nearest existing folder is the test."""
    out = Path(out_dir)
    where = f"--out {out_dir}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{where}: is a file, not a folder; name a folder with --out")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{where}: {existing} is a file, not a folder; name a folder with --out")
    for name in OUTPUTS:
        target = out / name
        if target.is_dir():
            raise UsageError(f"{where}: {target} is a folder; name another folder with --out")
        if target.exists() and not os.access(target, os.W_OK):
            raise UsageError(f"{where}: {target} is read-only; name another folder with --out")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(
            f"{where}: cannot write in {existing} ({err.strerror}); name another folder with --out"
        ) from None


EXTRA_MODULES = {"tqdm": "tqdm", "matplotlib": "matplotlib"}  # import name: package name


def check_extras():
    """Before any work: the "demo" extra (tqdm for the progress bar, matplotlib for the
    plot) is importable; a UsageError naming what is missing and how to install it."""
    missing = []
    for module, package in EXTRA_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise UsageError(
            f"fusedce train needs {' and '.join(missing)}, not installed: "
            f"pip install {' '.join(missing)} (in a checkout: pip install -e \".[demo]\")"
        )


def make_loss_fn(loss="fusedce", inplace=False, backend="auto"):
    """``loss_fn(logits (B, T, V), targets (B, T)) -> scalar`` mean next-token cross-entropy."""
    if loss == "torch":
        if inplace:
            raise ValueError("--inplace is a fusedce option; use it with --loss fusedce")
        return lambda logits, y: F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
    if loss != "fusedce":
        raise ValueError(f"loss must be 'fusedce' or 'torch', got {loss!r}")
    # inplace_backward writes the gradient over the logits: safe here, as nothing reads
    # them after the loss (the head's backward needs its input and weight, not its output).
    return lambda logits, y: fusedce.cross_entropy(
        logits.view(-1, logits.shape[-1]), y.reshape(-1), backend=backend, inplace_backward=inplace
    )


def sample_batch(tokens, batch_size, seq_len, gen):
    """``(x, y)`` of shape (batch_size, seq_len): random windows of the token stream and the
    same windows one token later (each position's next token is its target)."""
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size, 1), generator=gen)
    chunk = tokens[starts + torch.arange(seq_len + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def check_windows(n, seq_len):
    """A text of ``n`` tokens has windows of ``seq_len`` + 1 (input and next token) to
    sample; a UsageError otherwise."""
    if n < seq_len + 1:
        fix = f"use --seq-len {n - 1} or less, or " if n > 1 else "use "
        raise UsageError(
            f"the text is {n} GPT-2 tokens, too few for windows of {seq_len} + 1: "
            f"{fix}a longer --text-file"
        )


class Run:
    """One training run, a step at a time (``step()``): the model, its AdamW optimizer and
    its own batch generator, all from ``seed``, so two runs that differ in the loss
    function see the same data and start from the same model, however their steps are
    interleaved. ``losses`` and ``seconds`` grow by one per step."""

    def __init__(self, tokens, batch_size=8, seq_len=64, size="tiny", loss="fusedce",
                 inplace=False, backend="auto", lr=3e-3, seed=0, device="cpu",
                 model_overrides=None):
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if not lr > 0:
            raise UsageError(f"lr must be above 0, got {lr}")
        check_windows(tokens.numel(), seq_len)
        self.tokens, self.batch_size, self.seq_len, self.device = (
            tokens, batch_size, seq_len, device)
        self.label = run_label(loss, inplace)
        self.loss_fn = make_loss_fn(loss, inplace, backend)
        self.model = build_model(
            size, seed=seed, device=device, **{"n_ctx": max(seq_len, 16),
                                               **(model_overrides or {})}
        )
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95),
                                     weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(seed)
        self.losses, self.seconds = [], []

    def step(self):
        """One optimizer step; returns its loss (a 0-d tensor, not synced)."""
        x, y = sample_batch(self.tokens, self.batch_size, self.seq_len, self.gen)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        t0 = time.perf_counter()
        step_loss = self.loss_fn(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        step_loss.backward()
        self.opt.step()
        self.losses.append(step_loss.detach())
        self.seconds.append(time.perf_counter() - t0)  # without a sync: indicative on CUDA
        return self.losses[-1]

    def result(self):
        return {"loss": torch.stack(self.losses).tolist(), "seconds": self.seconds,
                "model": self.model, "label": self.label}


def run_label(loss, inplace):
    return f"{loss} (inplace)" if inplace else loss


def train(tokens, steps=200, batch_size=8, seq_len=64, size="tiny", loss="fusedce",
          inplace=False, backend="auto", lr=3e-3, seed=0, device="cpu", progress=False,
          model_overrides=None):
    """Train from ``seed``; returns ``{"loss": [per-step losses], "seconds": [...], "model",
    "label"}`` (one :class:`Run`)."""
    run = dict(batch_size=batch_size, seq_len=seq_len, size=size, loss=loss, inplace=inplace,
               backend=backend, lr=lr, seed=seed, device=device,
               model_overrides=model_overrides)
    return train_together(tokens, [run], steps, progress)[0]


def train_together(tokens, runs, steps=200, progress=False):
    """Trains one :class:`Run` per dict of arguments in ``runs``, their steps interleaved
    (the order turning each step), so that whatever else the machine does at a moment
    (another process, a frequency change) falls on every run alike; returns each run's
    ``train`` result."""
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    runs = [Run(tokens, **args) for args in runs]
    bar = range(steps)
    if progress:
        from tqdm import tqdm  # the "demo" extra

        names = ", ".join(run.label for run in runs)
        bar = tqdm(bar, desc=f"train ({names})", unit="step")
    for step in bar:
        order = runs if step % 2 == 0 else runs[::-1]
        for run in order:
            run.step()
        if progress and (step % 10 == 0 or step == steps - 1):
            # a host sync, every 10 steps
            bar.set_postfix(loss=" / ".join(f"{r.losses[-1].item():.3f}" for r in runs))
    return [run.result() for run in runs]


def write_curves(curves, out_dir, title=""):
    """``curves``: {label: [loss per step]} -> ``loss.csv`` and ``loss.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(curves)
    with open(out_dir / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *(f"loss_{k}" for k in labels)])
        for step, row in enumerate(zip(*(curves[k] for k in labels))):
            w.writerow([step, *(f"{v:.9g}" for v in row)])
    import matplotlib  # the "demo" extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = len(labels) == 2
    fig, axes = plt.subplots(
        2 if two else 1,
        1,
        figsize=(6.4, 4.8 if two else 3.6),
        dpi=100,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1.3] if two else [1]},
    )
    ax = axes[0, 0]
    for k, style in zip(labels, ("-", "--", ":")):
        ax.plot(curves[k], style, lw=1.4, label=k)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    if two:  # how far apart the two curves are, step by step
        a, b = (curves[k] for k in labels)
        gap = [max(abs(u - v), 1e-8) for u, v in zip(a, b)]  # 0 drawn at 1e-8
        axes[1, 0].semilogy(gap, lw=1.0, color="k")
        axes[1, 0].set_ylabel("|difference|")
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png")
    plt.close(fig)
    return out_dir / "loss.csv", out_dir / "loss.png"


def add_arguments(parser):
    parser.add_argument(
        "--steps", type=positive_int, default=200, metavar="N",
        help="optimizer steps (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N",
        help="windows of text in each step's batch (default: %(default)s)",
    )
    parser.add_argument(
        "--seq-len", type=positive_int, default=64, metavar="N",
        help="tokens in each window, the positions predicted per window (default: %(default)s)",
    )
    parser.add_argument(
        "--size", default="tiny", choices=sorted(SIZES),
        help="the GPT-2-style model's size (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=3e-3,
        help="AdamW's learning rate, above 0 (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=seed_int, default=0,
        help="seed of the initial weights and of the batches (default: %(default)s)",
    )
    parser.add_argument(
        "--loss",
        default="fusedce",
        choices=LOSSES,
        help="the loss function; both: train twice, same seed, steps in turn, and compare "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--inplace",
        action="store_true",
        help="fusedce's inplace_backward, the gradient written over the logits; with --loss "
        "fusedce or both (default: off)",
    )
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "triton", "torch"],
        help="fusedce's implementation: auto = Triton kernels on CUDA, PyTorch on the CPU; "
        "triton on the CPU runs Triton's interpreter (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default=None,
        help="where to train: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--text-file",
        default=None,
        metavar="PATH",
        help="a UTF-8 text to train on (default: standard-library docstrings)",
    )
    parser.add_argument(
        "--tokenizer-file",
        default=None,
        metavar="PATH",
        help="GPT-2's gpt2.tiktoken, to tokenize offline "
        "(default: $FUSEDCE_GPT2_BPE, else the copy shipped with fusedce)",
    )
    parser.add_argument(
        "--out",
        default="fusedce-train",
        metavar="DIR",
        help="the folder where loss.csv and loss.png go, made if need be "
        "(default: ./%(default)s)",
    )


def check_args(args):
    """Everything about the command line that can be checked before any work: a UsageError
    for the first problem."""
    if args.inplace and args.loss == "torch":
        raise UsageError("--inplace is a fusedce option: use it with --loss fusedce or both")
    if args.backend != "auto" and args.loss == "torch":
        raise UsageError(f"--backend {args.backend} is a fusedce option: use it with --loss "
                         f"fusedce or both")
    check_extras()
    check_text_file(args.text_file)
    check_out_dir(args.out)


def main(args):
    check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokens = load_tokens(args.text_file, args.tokenizer_file)
    check_windows(tokens.numel(), args.seq_len)
    source = args.text_file or "standard-library docstrings"
    print(
        f"{tokens.numel():,} GPT-2 tokens from {source}; model {args.size!r}, "
        f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps on {device}"
    )
    kinds = ("fusedce", "torch") if args.loss == "both" else (args.loss,)
    specs = [
        dict(batch_size=args.batch_size, seq_len=args.seq_len, size=args.size, loss=kind,
             inplace=args.inplace and kind == "fusedce", backend=args.backend, lr=args.lr,
             seed=args.seed, device=device)
        for kind in kinds
    ]
    # with both losses, their steps alternate: a busy moment of the machine falls on both
    runs = train_together(tokens, specs, steps=args.steps, progress=True)
    curves = {}
    for run in runs:
        label = run["label"]
        curves[label] = run["loss"]
        ms = 1e3 * sorted(run["seconds"])[len(run["seconds"]) // 2]
        print(
            f"{label}: loss {run['loss'][0]:.4f} -> {run['loss'][-1]:.4f}, median step {ms:.1f} ms"
        )
    if len(curves) == 2:
        a, b = curves.values()
        print(
            f"largest |difference| between the two curves over {args.steps} steps: "
            f"{max(abs(u - v) for u, v in zip(a, b)):.3e}"
        )
    title = (
        f"GPT-2-style '{args.size}' model on {source}, batch {args.batch_size}x"
        f"{args.seq_len}, {device}"
    )
    csv_path, png_path = write_curves(curves, args.out, title)
    print(f"wrote {csv_path} and {png_path}")
