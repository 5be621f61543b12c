"""A small GPT-2-style language model, for the demo, the training loop and the tests.

The GPT-2 architecture (Radford et al. 2019) in plain PyTorch: token and position
embeddings, pre-LayerNorm blocks of causal self-attention and a 4x GELU MLP, a final
LayerNorm, and an output head tied to the token embedding. Random initialisation as in
GPT-2 (normal, std 0.02; residual projections scaled by 1/sqrt(2 * layers)). No dropout, so
two runs from one seed compute the same numbers.

The head's output, logits of shape (batch, tokens, vocab), is what the loss reads: with
GPT-2's 50,257-token vocabulary it is the largest activation of a small model, which is why
the loss is worth fusing.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import VOCAB_SIZE


class UsageError(ValueError):
    """Bad input from the command line (an option, a text, a file): ``fusedce`` prints its
    message as one line and exits with status 2, without a traceback."""


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    n_ctx: int = 256  # longest sequence (position embeddings)
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64


# Named sizes for the command line; "gpt2" is GPT-2 small's shape (124M parameters).
SIZES = {
    "tiny": GPTConfig(n_layer=1, n_head=2, n_embd=32),
    "small": GPTConfig(n_layer=2, n_head=4, n_embd=128),
    "medium": GPTConfig(n_layer=6, n_head=8, n_embd=384, n_ctx=512),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, n_ctx=1024),
}


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.fc_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, h):
        b, t, c = h.shape
        q, k, v = self.qkv(self.ln_1(h)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return h + self.fc_proj(F.gelu(self.fc(self.ln_2(h)), approximate="tanh"))


class GPT(nn.Module):
    """``GPT(config)(ids)``: logits ``(batch, tokens, vocab)`` of ids ``(batch, tokens)``."""

    def __init__(self, config=None):
        super().__init__()
        cfg = self.config = config or GPTConfig()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled by depth
            for proj in (block.proj, block.fc_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def forward(self, ids):
        t = ids.shape[1]
        if t > self.config.n_ctx:
            raise ValueError(f"{t} tokens, the model takes at most n_ctx={self.config.n_ctx}")
        pos = torch.arange(t, device=ids.device)
        h = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            h = block(h)
        # Output head tied to the token embedding, as in GPT-2.
        return F.linear(self.ln_f(h), self.wte.weight)


def build_model(size="small", seed=0, device="cpu", **overrides):
    """A randomly initialised :class:`GPT` of a named size (see ``SIZES``), same for a seed.

    ``overrides`` replace fields of the size's config (``n_layer=4``, ``n_ctx=64``, ...).
    """
    if size not in SIZES:
        raise UsageError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    cfg = SIZES[size]
    if overrides:
        cfg = GPTConfig(**{**cfg.__dict__, **overrides})
    # Initialise on the CPU from a private generator: the same weights on every device,
    # without touching the global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(cfg)
    return model.to(device)
