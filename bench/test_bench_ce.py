"""pytest-benchmark suite: ``pytest bench/ --benchmark-only`` (not part of the default run).

One group per (dtype, pass, tokens) at V = 50,257, so pytest-benchmark's table compares
fusedce with eager PyTorch and ``torch.compile`` of it (and Liger-Kernel / quack on CUDA
when importable). Every round starts from a fresh copy of the logits (untimed ``setup``).
The cases and the byte model are those of ``python -m bench`` (``bench.ce``).

Smaller or larger sweeps: ``FUSEDCE_BENCH_TOKENS=512,2048 pytest bench/ --benchmark-only``.
"""

import os

import pytest
import torch

from bench import ce
from bench.byte_model import ce_bytes

TOKENS = [int(n) for n in os.environ.get("FUSEDCE_BENCH_TOKENS", "2048").split(",")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def inputs():
    cache = {}

    def get(tokens, dtype):
        if (tokens, dtype) not in cache:
            cache.clear()  # one logits tensor (and its working copy) alive at a time
            x, t = ce.make_inputs(tokens, ce.VOCAB, dtype, DEVICE)
            cache[tokens, dtype] = (x, t, torch.empty_like(x))
        return cache[tokens, dtype]

    return get


@pytest.mark.parametrize("tokens", TOKENS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("pass_", ce.PASSES)
@pytest.mark.parametrize("dtype", list(ce.DTYPES))
@pytest.mark.parametrize("case", ce.CASES)
def test_cross_entropy(benchmark, inputs, case, dtype, pass_, tokens):
    if not ce.applies(case, pass_):
        pytest.skip(f"{case} has no forward-only mode (it computes the gradient)")
    try:
        fn = ce.loss_fn(case, DEVICE)
    except ce.Unavailable as e:
        pytest.skip(str(e))
    pristine, target, work = inputs(tokens, dtype)
    ce.step.target = target
    benchmark.group = f"{dtype} {pass_} N={tokens} V={ce.VOCAB} {DEVICE}"
    model_pass = "fwd_bwd_inplace" if case == "fusedce_inplace" else pass_
    benchmark.extra_info["model_bytes"] = ce_bytes(tokens, ce.VOCAB, ce.DTYPES[dtype],
                                                   model_pass)

    def setup():
        x = work.detach()
        x.copy_(pristine)
        ce._sync(DEVICE)
        return (fn, pass_, x), {}

    def run(fn, pass_, x):
        keep = ce.step(fn, pass_, x)
        ce._sync(DEVICE)
        return keep

    run(*setup()[0])  # warm-up: compilation, worker threads
    result = benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
    loss = result if pass_ == "fwd" else result[0]
    assert torch.isfinite(loss).all()
