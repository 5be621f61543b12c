"""``fusedce demo``: the numbers it prints are right, from the command line too.

Each run's figures are checked against an independent float64 computation of the same
model's logits with ``F.cross_entropy``; the tokenizer is read from the local file (no network).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusedce import cli, tokenizer
from fusedce.demo import DEFAULT_TEXTS, batch_from_texts, run_demo
from fusedce.model import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
BPE_FILE = REPO_ROOT.parent / "shared" / "data" / "gpt2.tiktoken"


@pytest.fixture
def offline_tokenizer(monkeypatch):
    if not BPE_FILE.is_file():
        pytest.skip(f"GPT-2 merge ranks not found at {BPE_FILE} (shared/data beside the repo)")
    monkeypatch.setenv(tokenizer.ENV_VAR, str(BPE_FILE))
    return tokenizer.gpt2_encoding()


def _reference(texts, size, enc, seed=0):
    """float64 F.cross_entropy of the demo's model on the demo's batch, and its per-token
    target probabilities."""
    _, inputs, targets = batch_from_texts(texts, enc)
    with torch.no_grad():
        logits = build_model(size, seed=seed)(inputs).double()
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return float(loss), torch.exp(-per_token[targets != -100])


def test_default_run(offline_tokenizer, capsys):
    # Exactly what a newcomer runs: no arguments.
    assert cli.main([]) == 0
    printed = capsys.readouterr().out
    assert "(2, 3, 50257)" in printed  # two texts of 4 tokens: 3 next-token targets each
    assert "[16833, 3626, 6100, 345]" in printed  # "every effort moves you"
    assert "[40, 1107, 588, 11311]" in printed  # "I really like chocolate"
    for step in (
        "log p",
        "mean of the 6 log-probabilities",
        "its negative",
        "perplexity",
        "fusedce.cross_entropy",
        "F.cross_entropy",
        "largest |difference|",
    ):
        assert step in printed, step


@pytest.mark.parametrize(
    "texts, size",
    [
        pytest.param(DEFAULT_TEXTS, "small", id="default-texts"),
        # unequal lengths: the shorter text's padding is ignored (ignore_index=-100)
        pytest.param(
            ("Hello, world", "The quick brown fox jumps over the lazy dog."), "tiny", id="padded"
        ),
    ],
)
def test_figures_match_float64(offline_tokenizer, texts, size):
    lines = []
    res = run_demo(texts, device="cpu", size=size, repeats=2, out=lines.append)
    ref_loss, ref_p = _reference(texts, size, offline_tokenizer)
    n_targets = sum(len(offline_tokenizer.encode(t)) - 1 for t in texts)
    assert res["logits_shape"][0] == len(texts) and res["logits_shape"][2] == 50_257
    assert res["p_target"].numel() == n_targets
    # step by step, by hand (from fp32 logits) vs float64 F.cross_entropy
    torch.testing.assert_close(res["p_target"], ref_p, rtol=1e-5, atol=0)
    assert res["loss_by_hand"] == pytest.approx(ref_loss, abs=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(ref_loss), rel=1e-5)
    # the two library losses and their gradients
    assert res["loss_fusedce"] == pytest.approx(ref_loss, abs=1e-5)
    assert res["loss_torch"] == pytest.approx(ref_loss, abs=1e-5)
    assert res["grad_max_diff"] < 1e-7  # gradients are ~1/(rows * V) ~ 1e-6 each
    assert res["seconds_fusedce"] > 0 and res["seconds_torch"] > 0
    unequal = len({len(offline_tokenizer.encode(t)) for t in texts}) > 1
    assert any("ignored" in line for line in lines) == unequal


@pytest.mark.slow
def test_triton_backend_on_cpu_from_the_command_line(tmp_path):
    # `python -m fusedce --backend triton` in a fresh process: on a CPU-only machine the
    # command switches Triton's interpreter on by itself (TRITON_INTERPRET removed here).
    if not BPE_FILE.is_file():
        pytest.skip(f"GPT-2 merge ranks not found at {BPE_FILE} (shared/data beside the repo)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[tokenizer.ENV_VAR] = str(BPE_FILE)
    cmd = [
        sys.executable,
        "-m",
        "fusedce",
        "demo",
        "--size",
        "tiny",
        "--backend",
        "triton",
        "--repeats",
        "1",
        "I really like",
        "every effort moves",
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "-> Triton kernels" in proc.stdout
    if not torch.cuda.is_available():
        assert "setting TRITON_INTERPRET=1" in proc.stdout
    fused = next(ln for ln in proc.stdout.splitlines() if "fusedce.cross_entropy " in ln)
    torch_ = next(ln for ln in proc.stdout.splitlines() if "F.cross_entropy " in ln)
    assert abs(float(fused.split()[1]) - float(torch_.split()[1])) <= 1e-5


def test_without_tokenizer_the_error_names_both_ways(monkeypatch, capsys, tmp_path):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
    monkeypatch.setattr(tokenizer, "_CHECKOUT_FILE", tmp_path / "absent.tiktoken")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert tokenizer.ENV_VAR in err and "--tokenizer-file" in err


def test_one_token_text_is_refused(offline_tokenizer):
    with pytest.raises(ValueError, match="needs 2"):
        run_demo(
            ("Hello", "every effort moves"),
            device="cpu",
            size="tiny",
            repeats=1,
            out=lambda line: None,
        )
