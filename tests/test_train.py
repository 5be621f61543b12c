"""Training the small GPT with fusedce gives the loss curve of F.cross_entropy, step by step.

Each run starts from the same seed (same weights, same batches of GPT-2 tokens of the
standard-library docstrings), so the curves differ only by the loss function's rounding.

Tolerances, and why: fp32 losses near 10 carry rounding of ~1e-6 from the different summation
orders, and Adam carries a gradient difference of that relative size into the weights; over
a few dozen steps the measured gaps are |d loss| <= 2e-6 and |d weight| <= 5e-5 (lr 3e-3).
A tenfold margin on each: any real error in the loss or its gradient (a wrong denominator, a
missed row) moves the curve by far more.
"""

import csv
import os
from pathlib import Path

import pytest
import torch

from fusedce import cli, tokenizer
from fusedce.train import load_tokens, sample_batch, stdlib_text, train, write_curves

BPE_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2.tiktoken"
LOSS_ATOL = 2e-5
WEIGHT_ATOL = 5e-4
# tiny model (1 layer, width 32) but the real 50,257 vocabulary; 4 x 16 = 64 rows a step
RUN = dict(steps=30, batch_size=4, seq_len=16, size="tiny", lr=3e-3, seed=0)


@pytest.fixture(scope="module")
def tokens():
    if not BPE_FILE.is_file():
        pytest.skip(f"GPT-2 merge ranks not found at {BPE_FILE} (shared/data beside the repo)")
    old = os.environ.get(tokenizer.ENV_VAR)
    os.environ[tokenizer.ENV_VAR] = str(BPE_FILE)  # never the network
    try:
        yield load_tokens(max_tokens=20_000)
    finally:
        if old is None:
            del os.environ[tokenizer.ENV_VAR]
        else:
            os.environ[tokenizer.ENV_VAR] = old


@pytest.fixture(scope="module")
def torch_run(tokens):
    return train(tokens, loss="torch", **RUN)


def _max_weight_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_corpus_is_english_prose():
    text = stdlib_text()
    assert len(text) > 100_000
    assert text.count(" the ") > 1_000


@pytest.mark.parametrize("inplace", [False, True], ids=["fusedce", "fusedce-inplace"])
def test_curves_agree_and_loss_goes_down(tokens, torch_run, inplace):
    run = train(tokens, loss="fusedce", inplace=inplace, **RUN)
    ref = torch_run["loss"]
    assert len(run["loss"]) == len(ref) == RUN["steps"]
    gaps = [abs(a - b) for a, b in zip(run["loss"], ref)]
    assert max(gaps) <= LOSS_ATOL, f"largest per-step gap {max(gaps):.3e}"
    assert _max_weight_diff(run["model"], torch_run["model"]) <= WEIGHT_ATOL
    # it learns: from about log(50257) = 10.8 to well below (unigram statistics at least)
    first, last5 = run["loss"][0], sum(run["loss"][-5:]) / 5
    assert abs(first - 10.8) < 0.2
    assert last5 < first - 2.0, f"{first:.3f} -> {last5:.3f}"


@pytest.mark.slow
def test_triton_kernels_train_alike(tokens):
    # The kernels under Triton's interpreter (slow on the CPU: 3 steps of 2 x 8 rows).
    small = dict(RUN, steps=3, batch_size=2, seq_len=8)
    ref = train(tokens, loss="torch", **small)
    run = train(tokens, loss="fusedce", backend="triton", **small)
    gaps = [abs(a - b) for a, b in zip(run["loss"], ref["loss"])]
    assert max(gaps) <= LOSS_ATOL, gaps
    assert _max_weight_diff(run["model"], ref["model"]) <= WEIGHT_ATOL


def test_inplace_requires_fusedce(tokens):
    with pytest.raises(ValueError, match="inplace"):
        train(tokens, loss="torch", inplace=True, **dict(RUN, steps=1))


def test_cli_writes_csv_and_png(tokens, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(stdlib_text()[:20_000], encoding="utf-8")
    out = tmp_path / "out"
    rc = cli.main(
        [
            "train",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "8",
            "--loss",
            "both",
            "--inplace",
            "--text-file",
            str(text),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    with open(out / "loss.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss_fusedce (inplace)", "loss_torch"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    for _, a, b in rows[1:]:
        assert abs(float(a) - float(b)) <= LOSS_ATOL
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "largest |difference| between the two curves" in capsys.readouterr().out


def test_write_curves_roundtrip(tmp_path):
    # fp32 losses, as train() returns them: all their digits are kept
    curves = {"a": [3.0, 2.5, 2.0], "b": [float(torch.tensor(v)) for v in (3.0, 2.4, 2.1)]}
    csv_path, png_path = write_curves(curves, tmp_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["step", "loss_a", "loss_b"],
        ["0", "3", "3"],
        ["1", "2.5", "2.4000001"],
        ["2", "2", "2.0999999"],
    ]
    assert png_path.stat().st_size > 1_000


def test_batches_are_next_token_windows():
    tokens = torch.arange(1000, 1100)  # a stream whose values give their positions
    x, y = sample_batch(tokens, 5, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 15, dtype=torch.long))  # contiguous
    assert torch.equal(y, x + 1)  # each target is the token after its input
    assert int(y.max()) <= 1099  # never past the end
