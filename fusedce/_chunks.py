"""The building blocks of the fused linear losses, shared by ``fusedce.linear`` and the
vocab-parallel linear loss of ``fusedce.distributed``: how many rows a chunk of logits takes,
the chunk's logits product, and the sums that turn each chunk's logit gradient into the input,
weight and bias gradients."""

import torch

# Chunk size heuristic (rows per chunk), see ``chunk_rows``.
MIN_CHUNK_ROWS = 128  # fewer rows make the three matrix products inefficient
# Most bytes of logits per chunk. The CPU pays per operation (the PyTorch CE is a dozen
# ops per chunk) and per pass over the (V, H) weight gradient (one per chunk), so it wants
# few, large chunks (128 MiB: 512 GPT-2 rows; docs/benchmarks.md has the sweep). A GPU runs
# a 256-row product at full speed and keeps its memory for the model.
MAX_CHUNK_BYTES = {"cpu": 1 << 27, "cuda": 1 << 26}  # 128 MiB, 64 MiB
SHARE = 8  # a chunk holds at most 1/SHARE of the tokens (above MIN_CHUNK_ROWS)


def chunk_rows(n_rows, in_features, n_classes, itemsize, device_type="cpu"):
    """Rows per chunk for ``n_rows`` tokens, ``in_features`` hidden size, ``n_classes`` vocab.

    A power of two, at most ``n_rows / SHARE`` (so the chunk's logits are at most 1/SHARE of
    the full logits) but at least ``MIN_CHUNK_ROWS``, with at most ``MAX_CHUNK_BYTES`` of
    logits, and never more rows than tokens. ``in_features`` does not enter (the products'
    efficiency depends on the rows), it is kept for callers that tune on it.
    """
    del in_features
    if n_rows <= 0:
        return 1
    cap = MAX_CHUNK_BYTES.get(device_type, MAX_CHUNK_BYTES["cuda"])
    rows = max(MIN_CHUNK_ROWS, n_rows // SHARE)
    rows = min(rows, max(1, cap // max(1, n_classes * itemsize)))
    rows = 1 << (rows.bit_length() - 1)  # round down to a power of two
    return max(1, min(rows, n_rows))


# --- chunk building blocks (also the pieces a vocab-parallel loss reuses) -------------------


def logits_into(out, x_c, linear_weight, linear_bias=None):
    """``out = x_c @ linear_weight.T (+ linear_bias)``; ``out`` is a (rows, V) buffer view."""
    if linear_bias is None:
        return torch.mm(x_c, linear_weight.t(), out=out)
    return torch.addmm(linear_bias, x_c, linear_weight.t(), out=out)


class GradAccumulator:
    """Turns each chunk's logit gradient into the input, weight and bias gradients.

    ``grad_input`` (N, H) in the input's dtype is written chunk by chunk; ``grad_weight``
    (V, H) and ``grad_bias`` (V,) are sums over the chunks in fp32 (fp64 for an fp64
    weight). On the GPU a low-precision chunk product goes through one (V, H) scratch in the
    input dtype (cuBLAS accumulates within the chunk in fp32); on the CPU the chunk is upcast
    and multiplied in fp32, as fast as a bf16 product plus an fp32 add (docs/benchmarks.md)
    and without the (V, H) scratch.
    """

    def __init__(self, x, linear_weight, need_input, need_weight, need_bias, upcast=None):
        """``upcast``: the CPU's fp32 product (default on CPU tensors) or the GPU's scratch."""
        n_classes, in_features = linear_weight.shape
        acc = torch.promote_types(torch.float32, linear_weight.dtype)
        self.linear_weight = linear_weight
        self.grad_input = torch.empty_like(x, memory_format=torch.contiguous_format) \
            if need_input else None
        self.grad_weight = torch.zeros(n_classes, in_features, dtype=acc,
                                       device=x.device) if need_weight else None
        self.grad_bias = torch.zeros(n_classes, dtype=acc, device=x.device) \
            if need_bias else None
        self._scratch = None
        self._low_precision = x.dtype in (torch.float16, torch.bfloat16)
        self._upcast = x.device.type == "cpu" if upcast is None else upcast

    def add(self, dlogits, x_c, start, end):
        if self.grad_input is not None:
            torch.mm(dlogits, self.linear_weight, out=self.grad_input[start:end])
        if self.grad_weight is not None:
            if not self._low_precision:
                self.grad_weight.addmm_(dlogits.t(), x_c)
            elif self._upcast:
                self.grad_weight.addmm_(dlogits.t().float(), x_c.float())
            else:
                if self._scratch is None:
                    self._scratch = torch.empty_like(self.linear_weight,
                                                     memory_format=torch.contiguous_format)
                torch.mm(dlogits.t(), x_c, out=self._scratch)
                self.grad_weight.add_(self._scratch)
        if self.grad_bias is not None:
            self.grad_bias.add_(dlogits.sum(0, dtype=self.grad_bias.dtype))
