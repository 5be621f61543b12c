"""``fusedce demo``: GPT-2 tokens in, loss out, step by step.

Two short texts are tokenized with GPT-2's encoding, a small GPT-2-style model (random
initialisation, fixed seed) turns them into logits of shape (2, tokens, 50,257), and the
cross-entropy of next-token prediction is worked out by hand (softmax probability of each
target token, its log, the mean, its negative, the perplexity), then computed by
``fusedce.cross_entropy`` and ``torch.nn.functional.cross_entropy``, whose values, gradients
and times are compared.
"""

import math
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

import fusedce

from .model import SIZES, build_model
from .tokenizer import EOT_ID, gpt2_encoding

DEFAULT_TEXTS = ("every effort moves you", "I really like chocolate")
IGNORE_INDEX = -100  # F.cross_entropy's default; marks the padding of a shorter text


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def batch_from_texts(texts, enc):
    """``(tokens, inputs, targets)``: per-text token ids, and the (batch, n - 1) next-token
    inputs and targets, a shorter text padded with <|endoftext|> inputs and ignored targets."""
    tokens = [enc.encode(text) for text in texts]
    for text, ids in zip(texts, tokens):
        if len(ids) < 2:
            raise ValueError(f"{text!r} is {len(ids)} token(s); next-token prediction needs 2")
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
    machine's load touches both alike."""
    v = logits.shape[-1]
    times = {name: [] for name in loss_fns}
    results = {}
    for i in range(repeats + 1):
        for name, loss_fn in loss_fns.items():
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
    enc = gpt2_encoding(tokenizer_file)
    vocab = enc.n_vocab
    on_gpu = backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda")
    impl = "Triton kernels" if on_gpu else "PyTorch, chunked"
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
    tokens, inputs, targets = batch_from_texts(texts, enc)
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
        {"fusedce": partial(fusedce.cross_entropy, backend=backend), "torch": F.cross_entropy},
        logits,
        targets,
        repeats,
    )
    (loss_f, grad_f, t_f), (loss_t, grad_t, t_t) = timed["fusedce"], timed["torch"]
    grad_diff = (grad_f.double() - grad_t.double()).abs().max().item()
    n_rows = logits.shape[0] * logits.shape[1]
    out(f"5. The same loss from logits.view(-1, {vocab}) ({n_rows} rows) and targets.view(-1);")
    out(f"   forward + backward time, median of {repeats} after a warm-up, on {device}")
    out("   (on a shared or busy machine, timings of a few rows are noisy):")
    out(f"   fusedce.cross_entropy  {float(loss_f):.6f}   {t_f * 1e3:9.3f} ms")
    out(f"   F.cross_entropy        {float(loss_t):.6f}   {t_t * 1e3:9.3f} ms")
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
        default=list(DEFAULT_TEXTS),
        help=f"texts to score (default: {' / '.join(DEFAULT_TEXTS)})",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--size", default="small", choices=sorted(SIZES), help="model size (default: small)"
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="fusedce's implementation (default: auto = kernels on CUDA, "
        "PyTorch on the CPU; triton on the CPU runs Triton's interpreter)",
    )
    parser.add_argument(
        "--tokenizer-file",
        default=None,
        metavar="PATH",
        help="GPT-2's gpt2.tiktoken merge ranks, to tokenize offline "
        "(default: $FUSEDCE_GPT2_BPE, else tiktoken's download)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per loss")


def main(args):
    run_demo(
        texts=args.texts,
        device=args.device,
        size=args.size,
        backend=args.backend,
        tokenizer_file=args.tokenizer_file,
        seed=args.seed,
        repeats=args.repeats,
    )
