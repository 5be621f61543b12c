"""``fusedce demo``: GPT-2 tokens in, loss out, step by step.

Two short texts are tokenized with GPT-2's encoding, a small GPT-2-style model (random
initialisation, fixed seed) turns them into logits of shape (2, tokens, 50,257), and the
cross-entropy of next-token prediction is worked out by hand (softmax probability of each
target token, its log, the mean, its negative, the perplexity), then computed by
``fusedce.cross_entropy`` and ``torch.nn.functional.cross_entropy``, whose values, gradients
and times are compared.
"""

import argparse
import math
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

import fusedce
from fusedce import _route

from .model import SIZES, UsageError, build_model
from .tokenizer import EOT_ID, TokenizerUnavailable, gpt2_encoding

DEFAULT_TEXTS = ("every effort moves you", "I really like chocolate")
IGNORE_INDEX = -100  # F.cross_entropy's default; marks the padding of a shorter text


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# Checks of the command line shared by ``fusedce demo`` and ``fusedce train``: each failure is
# a UsageError (or argparse's own error), one line for the user, never a traceback.


def _whole_number(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_int(text):
    """argparse type: a seed that torch.manual_seed takes (64 bits)."""
    value = _whole_number(text)
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must fit in 64 bits, got {value}")
    return value


def positive_float(text):
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def check_device(device):
    """``device`` (None: the default) if this machine has it, else a UsageError."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return device
    if dev.type != "cuda":
        raise UsageError(f"--device {device!r}: fusedce runs on cpu or cuda[:N]")
    if not torch.cuda.is_available():
        why = "torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise UsageError(f"--device {device}: CUDA is not available here ({why}); "
                         "use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA "
                         f"device(s), numbered from 0")
    return device


def load_encoding(tokenizer_file=None):
    """GPT-2's encoding; a file that is not a ``.tiktoken`` file of merge ranks is a
    TokenizerUnavailable, like a missing one."""
    try:
        return gpt2_encoding(tokenizer_file)
    except TokenizerUnavailable:
        raise
    except (ValueError, OSError) as err:  # tiktoken's "Error parsing line ...", binascii
        raise TokenizerUnavailable(
            f"the GPT-2 tokenizer file could not be read ({err}); name GPT-2's gpt2.tiktoken "
            "with --tokenizer-file or $FUSEDCE_GPT2_BPE"
        ) from err


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def batch_from_texts(texts, enc):
    """``(tokens, inputs, targets)``: per-text token ids, and the (batch, n - 1) next-token
    inputs and targets, a shorter text padded with <|endoftext|> inputs and ignored targets."""
    tokens = [enc.encode(text) for text in texts]
    for text, ids in zip(texts, tokens):
        if len(ids) < 2:
            raise UsageError(
                f"text {text!r} is {len(ids)} GPT-2 token(s); next-token prediction needs 2 "
                "or more: give a longer text"
            )
    n = max(len(ids) for ids in tokens)
    inputs = torch.full((len(texts), n - 1), EOT_ID, dtype=torch.long)
    targets = torch.full((len(texts), n - 1), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(tokens):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, : len(ids) - 1] = torch.tensor(ids[1:])
    return tokens, inputs, targets


def time_losses(loss_fns, logits, targets, repeats):
    """``{name: (loss, grad, seconds)}`` for each ``name: loss_fn``: a forward and backward
    from a fresh copy of ``logits``; the time is the median over ``repeats`` runs after one
    warm-up (Triton compiles then), the functions taking turns so that a change in the
    machine's load touches both alike, and going first in turn (with fusedce always first,
    three runs of ``fusedce demo`` timed it 7-20% slower than PyTorch, both running
    PyTorch's own loss)."""
    v = logits.shape[-1]
    times = {name: [] for name in loss_fns}
    results = {}
    order = list(loss_fns.items())
    for i in range(repeats + 1):
        for name, loss_fn in order if i % 2 else order[::-1]:
            x = logits.detach().clone().requires_grad_()
            _sync(x.device)
            start = time.perf_counter()
            loss = loss_fn(x.view(-1, v), targets.view(-1), ignore_index=IGNORE_INDEX)
            loss.backward()
            _sync(x.device)
            if i:
                times[name].append(time.perf_counter() - start)
            results[name] = (loss.detach(), x.grad)
    return {name: (*results[name], statistics.median(times[name])) for name in loss_fns}


def _handed_off(n_rows, vocab):
    """Whether ``backend="auto"`` hands the demo's CPU call (fp32 logits (n_rows, vocab) that
    need a gradient, class indices) to PyTorch's own loss, as ``fusedce.cross_entropy``
    decides it."""
    return _route.serves_shape(n_rows, vocab)


def _fmt_token(enc, token_id):
    return repr(enc.decode([token_id]))


def run_demo(
    texts=DEFAULT_TEXTS,
    device=None,
    size="small",
    backend="auto",
    tokenizer_file=None,
    seed=0,
    repeats=20,
    out=print,
):
    """Run the demo, writing lines through ``out``; returns the figures it printed."""
    device = device or default_device()
    if repeats < 1:
        raise UsageError(f"repeats must be at least 1, got {repeats}")
    if size not in SIZES:
        raise UsageError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    enc = load_encoding(tokenizer_file)
    vocab = enc.n_vocab
    tokens, inputs, targets = batch_from_texts(texts, enc)
    n_ctx = SIZES[size].n_ctx
    if inputs.shape[1] > n_ctx:
        larger = [k for k, c in SIZES.items() if c.n_ctx > inputs.shape[1]]
        hint = f"--size {larger[0]} or " if larger else ""
        raise UsageError(
            f"the longest text is {inputs.shape[1] + 1} tokens; model {size!r} reads at most "
            f"{n_ctx + 1}: use {hint}a shorter text"
        )
    on_gpu = backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda")
    impl = "Triton kernels" if on_gpu else "fusedce's PyTorch implementation, chunked"
    handed_off = backend == "auto" and not on_gpu and _handed_off(inputs.numel(), vocab)
    if handed_off:
        impl = "PyTorch's own loss (a call this small: fusedce/_route.py)"
    model = build_model(size, seed=seed, device=device)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())

    out(f"fusedce {fusedce.__version__} demo: the cross-entropy of next-token prediction")
    threads = f" ({torch.get_num_threads()} threads)" if device == "cpu" else ""
    out(
        f"device {device}{threads}, torch {torch.__version__}, fusedce backend {backend!r} "
        f"-> {impl}"
    )
    out("")
    out(f"1. Tokenize with GPT-2's encoding (tiktoken, {vocab:,} tokens)")
    for i, (text, ids) in enumerate(zip(texts, tokens)):
        out(f"   text {i}: {text!r} -> {ids}")
    out("   inputs = tokens[:-1], targets = tokens[1:]: each position predicts the next token")
    if (targets == IGNORE_INDEX).any():
        out(f"   (shorter texts padded; their padded targets are {IGNORE_INDEX}, ignored)")
    out("")
    inputs, targets = inputs.to(device), targets.to(device)
    with torch.no_grad():
        logits = model(inputs)
    out(
        f"2. A small GPT-2-style model ({size!r}: {cfg.n_layer} layers, {cfg.n_head} heads, "
        f"width {cfg.n_embd}, {n_params / 1e6:.2f}M parameters, random init, seed {seed})"
    )
    out(f"   logits = model(inputs): shape {tuple(logits.shape)}, {logits.dtype}")
    out("")

    # By hand, in float64: softmax over the vocabulary, the target's probability, its log.
    probs = torch.softmax(logits.double(), dim=-1)
    kept = targets != IGNORE_INDEX
    p_target = probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_p = p_target.log()
    out("3. Softmax probability of each target token, and its logarithm")
    out(
        f"   {'text':>4} {'pos':>3}  {'input':>12} -> {'target':<12} {'p(target)':>11} {'log p':>9}"
    )
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if not kept[b, t]:
                continue
            out(
                f"   {b:>4} {t:>3}  {_fmt_token(enc, int(inputs[b, t])):>12} -> "
                f"{_fmt_token(enc, int(targets[b, t])):<12} {float(p_target[b, t]):11.4e} "
                f"{float(log_p[b, t]):9.4f}"
            )
    mean_log_p = log_p[kept].mean()
    ce = -mean_log_p
    out("")
    out(f"4. mean of the {int(kept.sum())} log-probabilities      {float(mean_log_p):.6f}")
    out(f"   its negative: the cross-entropy     {float(ce):.6f}")
    out(f"   perplexity = exp(cross-entropy)     {float(ce.exp()):,.1f}")
    out(
        f"   (a uniform guess over {vocab:,} tokens: log {vocab} = {math.log(vocab):.6f}, "
        f"perplexity {vocab:,})"
    )
    out("")

    timed = time_losses(
        {"fusedce": (fusedce.cross_entropy if backend == "auto"
                     else partial(fusedce.cross_entropy, backend=backend)),
         "torch": F.cross_entropy},
        logits,
        targets,
        repeats,
    )
    (loss_f, grad_f, t_f), (loss_t, grad_t, t_t) = timed["fusedce"], timed["torch"]
    grad_diff = (grad_f.double() - grad_t.double()).abs().max().item()
    n_rows = logits.shape[0] * logits.shape[1]
    rows = f"{n_rows} row" + ("" if n_rows == 1 else "s")
    out(f"5. The same loss from logits.view(-1, {vocab}) ({rows}) and targets.view(-1);")
    out(f"   forward + backward time, median of {repeats} after a warm-up, on {device}")
    out("   (on a shared or busy machine, timings of a few rows are noisy):")
    out(f"   fusedce.cross_entropy  {float(loss_f):.6f}   {t_f * 1e3:9.3f} ms")
    out(f"   F.cross_entropy        {float(loss_t):.6f}   {t_t * 1e3:9.3f} ms")
    if handed_off:
        out("   (both rows are PyTorch's loss here, their difference noise; --backend torch "
            "times fusedce's own path)")
    out(f"   |fusedce - by hand (float64)|          {abs(float(loss_f) - float(ce)):.3e}")
    out(f"   |fusedce - F.cross_entropy|            {abs(float(loss_f) - float(loss_t)):.3e}")
    out(f"   largest |difference| of d loss/d logits {grad_diff:.3e}")
    return {
        "tokens": tokens,
        "logits_shape": tuple(logits.shape),
        "p_target": p_target[kept],
        "loss_by_hand": float(ce),
        "perplexity": float(ce.exp()),
        "loss_fusedce": float(loss_f),
        "loss_torch": float(loss_t),
        "grad_max_diff": grad_diff,
        "seconds_fusedce": t_f,
        "seconds_torch": t_t,
        "impl": impl,
    }


def add_arguments(parser):
    parser.add_argument(
        "texts",
        nargs="*",
        metavar="TEXT",
        help="texts to score, each of 2 or more GPT-2 tokens "
        f"(default: {' / '.join(repr(t) for t in DEFAULT_TEXTS)})",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="where the model and the loss run: cpu, cuda, cuda:1, ... "
        "(default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--size",
        default="small",
        choices=sorted(SIZES),
        help="the random GPT-2-style model's size (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="fusedce's implementation: auto = Triton kernels on CUDA, PyTorch on the CPU; "
        "triton on the CPU runs Triton's interpreter (default: %(default)s)",
    )
    parser.add_argument(
        "--tokenizer-file",
        default=None,
        metavar="PATH",
        help="GPT-2's gpt2.tiktoken merge ranks, to tokenize offline "
        "(default: $FUSEDCE_GPT2_BPE, else the copy shipped with fusedce)",
    )
    parser.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="the model's initialisation seed (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=20,
        metavar="N",
        help="timed forward+backward runs of each loss, after a warm-up (default: %(default)s)",
    )


def main(args):
    run_demo(
        texts=args.texts or DEFAULT_TEXTS,
        device=args.device,
        size=args.size,
        backend=args.backend,
        tokenizer_file=args.tokenizer_file,
        seed=args.seed,
        repeats=args.repeats,
    )
