"""pytest-benchmark for the fused linear + cross-entropy (``pytest bench/test_bench_linear.py``).

A GPT-2-like head scaled down to run in seconds on a CPU: the vocabulary is much larger than
the hidden size, as in a language model, so the logits dominate the memory. The full-size
comparison (8,192 tokens, 768, 50,257) is ``python -m bench.linear``.
"""

import pytest

from bench import linear

TOKENS, HIDDEN, VOCAB = 1024, 256, 8192


@pytest.fixture(scope="module")
def inputs():
    return linear.make_inputs(TOKENS, HIDDEN, VOCAB, "fp32")


@pytest.mark.parametrize("case", linear.CASES)
def test_fwd_bwd(benchmark, inputs, case):
    benchmark.group = f"linear+CE fwd+bwd, CPU fp32, {TOKENS}x{HIDDEN}x{VOCAB}"
    fn = linear.loss_fn(case)
    benchmark.pedantic(linear.step, args=(fn, *inputs), rounds=5, warmup_rounds=1)
    x, w, _ = inputs
    assert x.grad is not None and w.grad is not None


def test_run_reports_every_case():
    """``run`` (what ``python -m bench`` calls): one row per case, ratios to unfused, and
    the memory probe in a subprocess finds the unfused logits larger than fusedce's chunk."""
    rows = linear.run(tokens=256, hidden=32, vocab=4096, repeats=1, warmup=0)
    by_case = {row["case"]: row for row in rows}
    assert set(by_case) == set(linear.CASES)
    assert by_case["unfused"]["time_ratio"] == 1.0
    assert by_case["unfused"]["extra_mib"] >= 256 * 4096 * 4 / 2**20  # the logits at least
    assert by_case["fusedce"]["mem_ratio"] < 0.5
