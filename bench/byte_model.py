"""The byte model: how many bytes a cross-entropy over (rows, C) logits must move.

Every implementation, whatever it does inside, has to read the logits at least once per
pass over them and write the gradient once. The counts below are that floor; a benchmark
turns them into GB/s (``bytes / seconds``) and into the fraction of a measured copy
bandwidth, so one model is shared by ``python -m bench`` and ``bench/gpu_check.py``.

Passes over the (rows, C) logits ``x`` of element size ``e`` (per-row traffic, the targets,
losses and log-sum-exp, is counted too but is negligible at LM vocabularies):

- ``"fwd"``: read ``x`` once (online softmax: max, sum of exp, target gather in one sweep).
  ``rows * C * e``
- ``"fwd_bwd"``: forward reads ``x``; backward reads ``x`` again and writes ``dx``.
  ``3 * rows * C * e``
- ``"fwd_bwd_inplace"``: the gradient is computed during the forward and written over ``x``
  (``inplace_backward=True``): read ``x``, write ``dx`` into the same storage.
  ``2 * rows * C * e``

The gradient has the dtype of the logits.

``"fwd_bwd"`` is what a loss with a separate backward must move, the yardstick for every
case. fusedce's CPU default mode computes the gradient during the forward into a separate
buffer and moves two of those three logits-sized passes, so its GB/s under this model is an
effective figure, above the traffic it really makes (as a fused kernel's is against a
naive count).
"""

import torch

PASSES = ("fwd", "fwd_bwd", "fwd_bwd_inplace")

# logits-sized reads + writes per pass: (reads, writes)
_LOGIT_PASSES = {"fwd": (1, 0), "fwd_bwd": (2, 1), "fwd_bwd_inplace": (1, 1)}

# per row: target (int64) read; loss and lse (fp32) written in the forward; in the
# backward lse read again and the upstream gradient (fp32) read
_ROW_BYTES = {"fwd": 8 + 4 + 4, "fwd_bwd": 8 + 4 + 4 + 8 + 4 + 4, "fwd_bwd_inplace": 8 + 4 + 4}


def element_size(dtype):
    """Bytes per element of ``dtype`` (a ``torch.dtype`` or its name, e.g. ``"bf16"``)."""
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16}[dtype]
    return torch.empty((), dtype=dtype).element_size()


def logit_passes(pass_):
    """``(reads, writes)`` of logits-sized tensors for ``pass_``."""
    if pass_ not in _LOGIT_PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    return _LOGIT_PASSES[pass_]


def ce_bytes(n_rows, n_cols, dtype, pass_="fwd"):
    """Minimum bytes moved by a cross-entropy over (n_rows, n_cols) logits of ``dtype``."""
    reads, writes = logit_passes(pass_)
    return (reads + writes) * n_rows * n_cols * element_size(dtype) + n_rows * _ROW_BYTES[pass_]


def floor_seconds(n_rows, n_cols, dtype, pass_, bandwidth_bytes_per_s):
    """The time ``ce_bytes`` takes at ``bandwidth_bytes_per_s`` (e.g. a measured copy)."""
    return ce_bytes(n_rows, n_cols, dtype, pass_) / bandwidth_bytes_per_s


def gbps(n_rows, n_cols, dtype, pass_, seconds):
    """Effective bandwidth in GB/s (1e9 bytes) of a run that took ``seconds``."""
    return ce_bytes(n_rows, n_cols, dtype, pass_) / seconds / 1e9


def copy_bytes(numel, dtype):
    """Bytes moved by ``dst.copy_(src)`` of ``numel`` elements: one read plus one write."""
    return 2 * numel * element_size(dtype)
