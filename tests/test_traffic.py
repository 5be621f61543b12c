"""The kernels' memory traffic, counted under Triton's interpreter.

Every load and store the interpreter executes goes through ``InterpreterBuilder``; wrapping
its load/store methods records the address of every active (unmasked) lane. Counting those
addresses per tensor shows how many times each logit is read and each gradient written:
the byte model the kernels are designed to (forward: read each logit once; backward: read
each logit once, write each gradient element once; everything else O(rows)).
"""

import os

import numpy as np
import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("counts the interpreter's loads and stores (needs TRITON_INTERPRET=1)",
                allow_module_level=True)

from triton.runtime import interpreter  # noqa: E402

from fusedce import kernels  # noqa: E402

V = 50_257  # the real GPT-2 vocabulary: an odd row length, rows at every alignment


class Traffic:
    """Addresses touched by loads and stores, one record per active lane."""

    def __init__(self):
        self.loads, self.stores = [], []

    @staticmethod
    def _record(log, ptrs, mask=None):
        addrs = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            addrs = addrs[np.asarray(mask.data).reshape(-1).astype(bool)]
        width = ptrs.get_element_ty().primitive_bitwidth // 8
        log.append((addrs.astype(np.uint64), width))

    def count(self, log, tensor):
        """Per-element access counts of ``tensor`` and the bytes moved to/from it."""
        base, size = tensor.data_ptr(), tensor.element_size()
        end = base + tensor.numel() * size
        hits = np.zeros(tensor.numel(), dtype=np.int64)
        nbytes = 0
        for addrs, width in log:
            inside = addrs[(addrs >= base) & (addrs < end)]
            nbytes += inside.size * width
            np.add.at(hits, ((inside - base) // size).astype(np.int64), 1)
        return hits, nbytes

    def total_bytes(self, log):
        return sum(addrs.size * width for addrs, width in log)


@pytest.fixture
def traffic(monkeypatch):
    rec = Traffic()
    builder = interpreter.InterpreterBuilder
    load, masked_load = builder.create_load, builder.create_masked_load
    store, masked_store = builder.create_store, builder.create_masked_store

    def create_load(self, ptr, *args):
        rec._record(rec.loads, ptr)
        return load(self, ptr, *args)

    def create_masked_load(self, ptrs, mask, *args):
        rec._record(rec.loads, ptrs, mask)
        return masked_load(self, ptrs, mask, *args)

    def create_store(self, ptr, val, *args):
        rec._record(rec.stores, ptr)
        return store(self, ptr, val, *args)

    def create_masked_store(self, ptrs, val, mask, *args):
        rec._record(rec.stores, ptrs, mask)
        return masked_store(self, ptrs, val, mask, *args)

    monkeypatch.setattr(builder, "create_load", create_load)
    monkeypatch.setattr(builder, "create_masked_load", create_masked_load)
    monkeypatch.setattr(builder, "create_store", create_store)
    monkeypatch.setattr(builder, "create_masked_store", create_masked_store)
    return rec


def inputs(dtype, n=3):
    gen = torch.Generator().manual_seed(0)
    # a slice of a larger buffer, so that bytes read just outside our rows would be
    # inside memory the interpreter can address and would show up as over-reads
    padded = torch.randn(n + 2, V, generator=gen).to(dtype)
    x = padded[1:-1]
    target = torch.randint(0, V, (n,), generator=gen)
    return padded, x, target


def other_bytes(rec, log, *tensors):
    """Bytes moved outside the given tensors (targets, lse, per-row values...)."""
    return rec.total_bytes(log) - sum(rec.count(log, t)[1] for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_reads_each_logit_once(traffic, dtype):
    padded, x, target = inputs(dtype)
    loss, lse = kernels.ce_fwd(x, target)
    hits, nbytes = traffic.count(traffic.loads, x)
    assert (hits == 1).all(), f"logits read {np.unique(hits)} times"
    assert nbytes == x.numel() * x.element_size()
    padded_hits, _ = traffic.count(traffic.loads, padded)
    assert padded_hits.sum() == hits.sum(), "read outside the rows"
    assert traffic.count(traffic.stores, x)[1] == 0, "the forward must not write the logits"
    # besides the logits: O(rows) (target in, loss and lse out)
    assert other_bytes(traffic, traffic.loads, padded) <= 64 * x.shape[0]
    assert other_bytes(traffic, traffic.stores) <= 64 * x.shape[0]
    print(f"\nforward {dtype}: logits read {nbytes} B = rows x V x {x.element_size()}, "
          f"other loads {other_bytes(traffic, traffic.loads, padded)} B, "
          f"stores {traffic.total_bytes(traffic.stores)} B")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_reads_each_logit_once_and_writes_each_gradient_once(traffic, dtype):
    padded, x, target = inputs(dtype)
    loss, lse = kernels.ce_fwd(x, target)
    traffic.loads.clear()
    traffic.stores.clear()
    dloss = torch.full((1,), 0.5).expand(x.shape[0])
    dx = kernels.ce_bwd(x, target, lse, dloss)
    reads, read_bytes = traffic.count(traffic.loads, x)
    writes, write_bytes = traffic.count(traffic.stores, dx)
    assert (reads == 1).all(), f"logits read {np.unique(reads)} times"
    assert (writes == 1).all(), f"gradient elements written {np.unique(writes)} times"
    assert read_bytes == write_bytes == x.numel() * x.element_size()
    assert traffic.count(traffic.loads, dx)[1] == 0, "the backward must not read its output"
    assert other_bytes(traffic, traffic.loads, padded) <= 64 * x.shape[0]
    assert other_bytes(traffic, traffic.stores, dx) == 0
    print(f"\nbackward {dtype}: logits read {read_bytes} B, gradient written {write_bytes} B, "
          f"other loads {other_bytes(traffic, traffic.loads, padded)} B")


def test_inplace_forward_writes_the_gradient_over_the_logits(traffic):
    """The in-place forward: one streaming read for the log-sum-exp, then the gradient pass
    re-reads the row (on a GPU from L2, the row having just gone by) and writes it once."""
    padded, x, target = inputs(torch.bfloat16)
    scale = torch.ones(1)
    kernels.ce_fwd(x, target, grad_scale=scale)
    reads, _ = traffic.count(traffic.loads, x)
    writes, write_bytes = traffic.count(traffic.stores, x)
    assert (reads == 2).all() and (writes == 1).all()
    padded_writes, _ = traffic.count(traffic.stores, padded)
    assert padded_writes.sum() == writes.sum(), "wrote outside the rows"
    traffic.loads.clear()
    traffic.stores.clear()
    kernels.ce_scale_(x, torch.ones(1).expand(x.shape[0]))  # upstream gradient 1
    assert traffic.count(traffic.loads, x)[1] == 0 and traffic.total_bytes(traffic.stores) == 0
