"""pytest-benchmark groups of small calls: ``pytest bench/test_bench_small.py --benchmark-only``.

One group per (mode, dtype, rows x classes) of ``python -m bench.grid``'s grid, so that
pytest-benchmark's table sets fusedce's ``cross_entropy`` beside ``F.cross_entropy`` on the
calls a patched program makes besides the language-model loss (batches of one, 10-class and
2-class heads). ``python -m bench.grid`` gives the same cells as ratios taken call by call.

Another selection: ``FUSEDCE_BENCH_SMALL=1x10,6x50257 pytest bench/test_bench_small.py ...``.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import fusedce
from bench.grid import DTYPES, MODES, make_call

SHAPES = [tuple(int(v) for v in s.split("x")) for s in
          os.environ.get("FUSEDCE_BENCH_SMALL", "1x2,1x50257,8x1000,512x32,4096x10").split(",")]
IMPLEMENTATIONS = {"fusedce": fusedce.cross_entropy, "F.cross_entropy": F.cross_entropy}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_small_call(benchmark, impl, mode, dtype, shape):
    n, c = shape
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=gen) * 2).to(DTYPES[dtype])
    target = torch.randint(0, c, (n,), generator=gen)
    benchmark.group = f"{mode} {dtype} {n}x{c}"
    benchmark(make_call(IMPLEMENTATIONS[impl], x, target, mode))
