"""The command-line tools: ``fusedce demo``, ``fusedce train``, the GPT-2 tokenizer loader
they share, and ``python -m bench``.

- demo: the numbers it prints are right (against an independent float64 computation of the
  same model's logits with ``F.cross_entropy``), from the command line too;
- train: training the small GPT with fusedce gives the loss curve of F.cross_entropy, step
  by step (same seed, same weights and batches of GPT-2 tokens of the standard library's
  docstrings: the curves differ only by the loss function's rounding);
- tokenizer: offline from a .tiktoken file, and a clear error without one;
- bench: ``python -m bench`` end to end on a tiny sweep (the README's benchmark command; the
  figures themselves are measured by hand, not here), its ``--logits`` option, and
  ``python -m bench.script_ablation``.

The network is never touched: every test names the GPT-2 merge-ranks file (option or
FUSEDCE_GPT2_BPE), or uses the copy shipped in the package, or replaces tiktoken's download
by a failing stub.

Training tolerances, and why: fp32 losses near 10 carry rounding of ~1e-6 from the different
summation orders, and Adam carries a gradient difference of that relative size into the
weights; over a few dozen steps the measured gaps are |d loss| <= 2e-6 and |d weight| <= 5e-5
(lr 3e-3). A tenfold margin on each: any real error in the loss or its gradient (a wrong
denominator, a missed row) moves the curve by far more.
"""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO_ROOT, checkout_env

from fusedce import _route
from fusedce.app import cli, tokenizer
from fusedce.app.demo import DEFAULT_TEXTS, batch_from_texts, run_demo
from fusedce.app.model import build_model
from fusedce.app.train import load_tokens, sample_batch, stdlib_text, train, write_curves
from fusedce.cpu import chunks, pool

BPE_FILE = tokenizer._PACKAGED_FILE  # shipped in the package: never missing
LOSS_ATOL = 2e-5
WEIGHT_ATOL = 5e-4
# tiny model (1 layer, width 32) but the real 50,257 vocabulary; 4 x 16 = 64 rows a step
RUN = dict(steps=30, batch_size=4, seq_len=16, size="tiny", lr=3e-3, seed=0)

# Ids of tiktoken's own "gpt2" encoding (fusedce/app/data/README.md).
KNOWN = [
    pytest.param("every effort moves", [16833, 3626, 6100], id="words"),
    pytest.param("I really like", [40, 1107, 588], id="leading-capital"),
    pytest.param("Hello, world", [15496, 11, 995], id="punctuation"),
]


def packaged_bpe_file():
    assert BPE_FILE.is_file(), f"the merge ranks shipped in the package are missing: {BPE_FILE}"
    return BPE_FILE


@pytest.fixture
def bpe_file():
    return packaged_bpe_file()


@pytest.fixture
def offline_tokenizer(bpe_file, monkeypatch):
    monkeypatch.setenv(tokenizer.ENV_VAR, str(bpe_file))
    return tokenizer.gpt2_encoding()


@pytest.fixture
def no_download(monkeypatch):
    """tiktoken's download fails as it does offline, and is counted."""
    import tiktoken

    calls = []

    def offline(name):
        calls.append(name)
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    return calls


@pytest.fixture(scope="module")
def tokens():
    bpe_file = packaged_bpe_file()
    old = os.environ.get(tokenizer.ENV_VAR)
    os.environ[tokenizer.ENV_VAR] = str(bpe_file)  # never the network
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


def _reference(texts, size, enc, seed=0):
    """float64 F.cross_entropy of the demo's model on the demo's batch, and its per-token
    target probabilities."""
    _, inputs, targets = batch_from_texts(texts, enc)
    with torch.no_grad():
        logits = build_model(size, seed=seed)(inputs).double()
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return float(loss), torch.exp(-per_token[targets != -100])


def _max_weight_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


class TestDemo:
    """``fusedce demo``: the figures it prints, in process and from the command line."""

    def test_default_run(self, offline_tokenizer, capsys):
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
        # 6 x 50,257 logits: "auto" hands the call to PyTorch's loss, and the demo says so
        assert "'auto' -> PyTorch's own loss (a call this small" in printed

    @pytest.mark.parametrize("route", ["backend-torch", "hand-off-off"])
    def test_header_names_fusedce_s_own_path_where_it_runs(self, offline_tokenizer, route,
                                                           monkeypatch):
        if route == "hand-off-off":  # as _route.set_hand_off(False): the inline test too
            monkeypatch.setattr(_route, "HAND_OFF", False)
            monkeypatch.setattr(_route, "SMALLEST", 0)
            args = dict(backend="auto")
        else:
            args = dict(backend="torch")
        lines = []
        run_demo(DEFAULT_TEXTS, device="cpu", repeats=1, out=lines.append, **args)
        assert f"'{args['backend']}' -> fusedce's PyTorch implementation, chunked" in lines[1]

    @pytest.mark.parametrize(
        "texts, size",
        [
            pytest.param(DEFAULT_TEXTS, "small", id="default-texts"),
            # unequal lengths: the shorter text's padding is ignored (ignore_index=-100)
            pytest.param(("Hello, world", "The quick brown fox jumps over the lazy dog."),
                         "tiny", id="padded"),
        ],
    )
    def test_figures_match_float64(self, offline_tokenizer, texts, size, own_path):
        # own_path: the demo's calls are small enough to be handed to PyTorch's loss, which
        # would make its fusedce-against-PyTorch figures compare PyTorch with itself
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
    def test_triton_backend_on_cpu_from_the_command_line(self, bpe_file, tmp_path):
        # `python -m fusedce --backend triton` in a fresh process: on a CPU-only machine the
        # command switches Triton's interpreter on by itself (TRITON_INTERPRET removed here).
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env[tokenizer.ENV_VAR] = str(bpe_file)
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
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "-> Triton kernels" in proc.stdout
        if not torch.cuda.is_available():
            assert "setting TRITON_INTERPRET=1" in proc.stdout
        fused = next(ln for ln in proc.stdout.splitlines() if "fusedce.cross_entropy " in ln)
        torch_ = next(ln for ln in proc.stdout.splitlines() if "F.cross_entropy " in ln)
        assert abs(float(fused.split()[1]) - float(torch_.split()[1])) <= 1e-5

    def test_without_tokenizer_the_error_names_both_ways(self, monkeypatch, no_download, capsys,
                                                         tmp_path):
        # only a broken install lacks the packaged merge ranks
        monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
        monkeypatch.setattr(tokenizer, "_PACKAGED_FILE", tmp_path / "absent.tiktoken")
        assert cli.main(["demo"]) == 2
        err = capsys.readouterr().err
        assert tokenizer.ENV_VAR in err and "--tokenizer-file" in err

    def test_one_token_text_is_refused(self, offline_tokenizer):
        with pytest.raises(ValueError, match="needs 2"):
            run_demo(
                ("Hello", "every effort moves"),
                device="cpu",
                size="tiny",
                repeats=1,
                out=lambda line: None,
            )


class TestTrain:
    """``fusedce train``: the loss curves of fusedce and F.cross_entropy agree."""

    def test_corpus_is_english_prose(self):
        text = stdlib_text()
        assert len(text) > 100_000
        assert text.count(" the ") > 1_000

    @pytest.mark.parametrize("inplace", [False, True], ids=["fusedce", "fusedce-inplace"])
    def test_curves_agree_and_loss_goes_down(self, tokens, torch_run, inplace, own_path):
        # own_path: a step's 64 x 50,257 logits would be handed to PyTorch's loss
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
    def test_triton_kernels_train_alike(self, tokens):
        # The kernels under Triton's interpreter (slow on the CPU: 3 steps of 2 x 8 rows).
        small = dict(RUN, steps=3, batch_size=2, seq_len=8)
        ref = train(tokens, loss="torch", **small)
        run = train(tokens, loss="fusedce", backend="triton", **small)
        gaps = [abs(a - b) for a, b in zip(run["loss"], ref["loss"])]
        assert max(gaps) <= LOSS_ATOL, gaps
        assert _max_weight_diff(run["model"], ref["model"]) <= WEIGHT_ATOL

    def test_runs_trained_together_alternate_and_match_alone(self, tokens, monkeypatch):
        """``--loss both`` steps its two runs in turn (fusedce first on even steps, PyTorch
        first on odd ones), so that a busy stretch of the machine, which used to fall on
        whichever run it met (one run of 30 steps, then the other), falls on both. Each run
        keeps its own model, optimizer and batches: its losses are those it has alone."""
        from fusedce.app import train as train_mod

        small = dict(batch_size=2, seq_len=8, lr=3e-3, seed=3)
        alone = [train(tokens, steps=4, loss=k, **small)["loss"] for k in ("fusedce", "torch")]
        order, step = [], train_mod.Run.step

        def recording(self):
            order.append(self.label)
            return step(self)

        monkeypatch.setattr(train_mod.Run, "step", recording)
        runs = train_mod.train_together(
            tokens, [dict(small, loss="fusedce"), dict(small, loss="torch")], steps=4)
        assert [r["loss"] for r in runs] == alone
        assert order == ["fusedce", "torch", "torch", "fusedce"] * 2

    def test_inplace_requires_fusedce(self, tokens):
        with pytest.raises(ValueError, match="inplace"):
            train(tokens, loss="torch", inplace=True, **dict(RUN, steps=1))

    def test_cli_writes_csv_and_png(self, tokens, tmp_path, capsys):
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

    def test_write_curves_roundtrip(self, tmp_path):
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

    def test_batches_are_next_token_windows(self):
        tokens = torch.arange(1000, 1100)  # a stream whose values give their positions
        x, y = sample_batch(tokens, 5, 16, torch.Generator().manual_seed(0))
        assert x.shape == y.shape == (5, 16)
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 15, dtype=torch.long))  # contiguous
        assert torch.equal(y, x + 1)  # each target is the token after its input
        assert int(y.max()) <= 1099  # never past the end


class TestTokenizer:
    """The GPT-2 tokenizer loader: the packaged merge ranks by default, a named file first,
    never the network, and clear errors for a missing or wrong file."""

    @pytest.fixture
    def bpe_file(self):
        """The copy shipped in the package: always there, so nothing here skips."""
        return tokenizer._PACKAGED_FILE

    @pytest.mark.parametrize("how", ["default", "env", "option"])
    @pytest.mark.parametrize("text, ids", KNOWN)
    def test_known_encodings(self, bpe_file, monkeypatch, no_download, how, text, ids):
        monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
        if how == "default":
            enc = tokenizer.gpt2_encoding()
        elif how == "env":
            monkeypatch.setenv(tokenizer.ENV_VAR, str(bpe_file))
            enc = tokenizer.gpt2_encoding()
        else:
            enc = tokenizer.gpt2_encoding(bpe_file=bpe_file)
        assert enc.encode(text) == ids
        assert enc.decode(ids) == text
        assert no_download == []  # tiktoken's download is never tried

    def test_special_token_and_vocab(self, monkeypatch):
        monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
        enc = tokenizer.gpt2_encoding()
        assert enc.n_vocab == tokenizer.VOCAB_SIZE == 50_257
        assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
        assert enc.eot_token == tokenizer.EOT_ID
        assert tokenizer.EOT == "<|endoftext|>"
        # Unicode round-trips through the byte-level BPE.
        text = "naïve café – 日本語 🙂"
        assert enc.decode(enc.encode(text)) == text

    def test_same_definition_as_tiktokens_gpt2(self, bpe_file, monkeypatch):
        """tiktoken's own "gpt2" encoding, its merge ranks (a download) replaced by the
        packaged ones: the same split pattern, special tokens and ids as the loader's."""
        import tiktoken.load
        from tiktoken_ext import openai_public

        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken copies no file into a cache
        ranks = tiktoken.load.load_tiktoken_bpe(str(bpe_file))  # tiktoken's own reader
        monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks",
                            lambda *args, **kwargs: ranks)
        theirs = tiktoken.Encoding(**openai_public.gpt2())
        monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
        ours = tokenizer.gpt2_encoding()
        assert ours.name == theirs.name == "gpt2"
        assert ours._pat_str == theirs._pat_str
        assert ours._special_tokens == theirs._special_tokens == {"<|endoftext|>": 50256}
        assert ours._mergeable_ranks == theirs._mergeable_ranks
        text = "The quick brown fox's 12,345 jumps -- don't stop!\n\tnaïve 日本語 🙂"
        assert ours.encode(text) == theirs.encode(text)

    def test_option_wins_over_env(self, bpe_file, monkeypatch, tmp_path):
        monkeypatch.setenv(tokenizer.ENV_VAR, str(tmp_path / "missing.tiktoken"))
        assert tokenizer.gpt2_encoding(bpe_file=bpe_file).encode("I really like") == [40, 1107, 588]

    def test_named_file_wins_over_the_packaged_one(self, monkeypatch, tmp_path):
        # a GPT-2-sized file of other ranks (0 and 1 swapped) is used, not the packaged copy
        lines = tokenizer._PACKAGED_FILE.read_bytes().splitlines()
        (a, _), (b, _) = lines[0].split(), lines[1].split()
        other = tmp_path / "other.tiktoken"
        other.write_bytes(b"\n".join([a + b" 1", b + b" 0", *lines[2:]]) + b"\n")
        monkeypatch.setenv(tokenizer.ENV_VAR, str(other))
        assert tokenizer.gpt2_encoding().encode("!") == [1]
        assert tokenizer.gpt2_encoding(bpe_file=tokenizer._PACKAGED_FILE).encode("!") == [0]

    def test_named_missing_file_is_an_error(self, monkeypatch, no_download, tmp_path):
        missing = tmp_path / "nope.tiktoken"
        monkeypatch.setenv(tokenizer.ENV_VAR, str(missing))
        with pytest.raises(tokenizer.TokenizerUnavailable, match="does not exist"):
            tokenizer.gpt2_encoding()
        with pytest.raises(tokenizer.TokenizerUnavailable, match="does not exist"):
            tokenizer.gpt2_encoding(bpe_file=missing)
        assert no_download == []  # a named file is never silently replaced

    def test_wrong_file_is_an_error(self, tmp_path):
        bad = tmp_path / "tiny.tiktoken"
        bad.write_text("YQ== 0\nYg== 1\n")  # two ranks: not GPT-2's
        with pytest.raises(tokenizer.TokenizerUnavailable, match="merge ranks"):
            tokenizer.gpt2_encoding(bpe_file=bad)

    @pytest.mark.parametrize("contents", [
        pytest.param(b"hello world, not a tokenizer\n", id="text"),
        pytest.param(b"YQ== zero\n", id="rank-not-a-number"),
        pytest.param(b"Y*Q== 0\n", id="not-base64"),
        pytest.param(bytes(range(256)) * 4, id="binary"),
    ])
    def test_garbage_file_is_a_clear_error(self, tmp_path, capsys, contents):
        # tiktoken's own reader raises a bare "ValueError: Error parsing line" here
        bad = tmp_path / "garbage.tiktoken"
        bad.write_bytes(contents)
        with pytest.raises(tokenizer.TokenizerUnavailable, match="not a .tiktoken file") as err:
            tokenizer.gpt2_encoding(bpe_file=bad)
        assert str(bad) in str(err.value) and "line 1" in str(err.value)
        # and from the command line: exit status 2 and the message, no traceback
        assert cli.main(["demo", "--tokenizer-file", str(bad)]) == 2
        printed = capsys.readouterr().err
        assert "not a .tiktoken file" in printed and "Traceback" not in printed

    def test_missing_packaged_file_names_both_ways(self, monkeypatch, no_download, tmp_path):
        monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
        monkeypatch.setattr(tokenizer, "_PACKAGED_FILE", tmp_path / "absent.tiktoken")
        with pytest.raises(tokenizer.TokenizerUnavailable) as err:
            tokenizer.gpt2_encoding()
        message = str(err.value)
        assert "reinstall fusedce" in message
        assert tokenizer.ENV_VAR in message and "--tokenizer-file" in message
        assert no_download == []

    def test_damaged_packaged_file_is_refused(self, monkeypatch, tmp_path):
        damaged = tmp_path / "gpt2.tiktoken"
        data = tokenizer._PACKAGED_FILE.read_bytes()
        damaged.write_bytes(data[:-20])  # a truncated copy
        monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
        monkeypatch.setattr(tokenizer, "_PACKAGED_FILE", damaged)
        with pytest.raises(tokenizer.TokenizerUnavailable, match="damaged"):
            tokenizer.gpt2_encoding()

    def test_nothing_outside_the_package_is_looked_for(self):
        package = Path(tokenizer.__file__).resolve().parent
        assert tokenizer._PACKAGED_FILE.parent == package / "data"
        assert not hasattr(tokenizer, "_CHECKOUT_FILE")


class TestBench:
    """``python -m bench`` and its tools."""

    @pytest.mark.slow
    def test_bench_runs_end_to_end_with_a_logits_level(self, tmp_path):
        env = checkout_env()
        env.pop("FUSEDCE_BENCH_LOGITS", None)
        cmd = [sys.executable, "-m", "bench", "--tokens", "8", "--vocab", "300", "--dtypes",
               "fp32,bf16", "--passes", "fwd,fwd_bwd", "--cases", "eager,fusedce,fusedce_inplace",
               "--repeats", "1", "--memory", "largest", "--logits=-60,3", "--out", str(tmp_path)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        rows = list(csv.DictReader(open(tmp_path / "ce_cpu.csv")))
        # fwd: eager, fusedce (the in-place case has no forward alone); fwd_bwd: all three
        assert len(rows) == 2 * (2 + 3)
        assert all(float(r["time_ms"]) > 0 and r["extra_mib"] != "" for r in rows)
        md = (tmp_path / "ce_cpu.md").read_text()
        assert "logits ~ N(-60.0, 3.0)" in md and "| fusedce_inplace |" in md
        # 8 x 300 logits: every fusedce call is one PyTorch's loss serves, and says so
        assert {(r["case"], r["served_by"]) for r in rows} == {
            ("eager", ""), ("fusedce", "PyTorch"), ("fusedce_inplace", "PyTorch")}
        assert "| served by |" in md
        assert (tmp_path / "ce_cpu.png").stat().st_size > 0

    def test_a_handed_off_in_place_call_counts_its_gradient(self):
        """Where PyTorch's loss serves the call (small, on the CPU), inplace_backward has no
        effect: the step makes a logits-sized gradient, which the memory column subtracts
        as it does for the other cases, not counted as the in-place case's overhead."""
        from bench.ce import grad_bytes, served_by_pytorch

        for tokens, dtype, served in [(256, "bf16", True), (512, "fp32", False)]:
            logits = tokens * 50_257 * (2 if dtype == "bf16" else 4)
            assert served_by_pytorch("fusedce_inplace", "fwd_bwd", tokens, 50_257, dtype) \
                is served
            assert grad_bytes("fusedce_inplace", "fwd_bwd", tokens, 50_257, dtype) == \
                (logits if served else 0)
            assert grad_bytes("fusedce", "fwd_bwd", tokens, 50_257, dtype) == logits
        assert not served_by_pytorch("eager", "fwd_bwd", 8, 300)

    def test_make_inputs_follows_the_logits_level(self, monkeypatch):
        from bench.ce import make_inputs

        monkeypatch.setenv("FUSEDCE_BENCH_LOGITS", "-60,3")
        x, t = make_inputs(64, 1000)
        assert abs(x.mean().item() + 60) < 0.1 and abs(x.std().item() - 3) < 0.1
        monkeypatch.delenv("FUSEDCE_BENCH_LOGITS")
        x, _ = make_inputs(64, 1000)
        assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 2) < 0.1
        assert t.dtype == torch.int64

    def test_floor_times_the_passes_beside_the_losses(self, capsys):
        """``python -m bench.floor`` on a tiny shape: a positive median for copy, exp, exp2 and
        each loss; the 4x line needs torch.compile's time (not run here: it compiles)."""
        from bench import floor

        times = floor.run(tokens=8, vocab=300, repeats=2, losses=("fusedce", "eager"))
        assert list(times) == ["copy", "exp", "exp2", "fusedce", "eager"]
        assert all(t > 0 for t in times.values())
        text = floor.report(times, 8, 300, 2)
        assert "| exp | g = exp(x) |" in text and "4x torch.compile" not in text
        text = floor.report({**times, "compile": 4 * times["exp"]}, 8, 300, 2)
        assert "| compile | fwd+bwd |" in text and "| exp | g = exp(x) |" in text
        assert f"at most {times['exp'] * 1e3:.1f} ms" in text
        with pytest.raises(SystemExit):
            floor.main(["--repeats", "0"])
        assert "--repeats: must be at least 1, got 0" in capsys.readouterr().err

    def test_revisions_runs_the_matmul_before_each_timed_call(self):
        """``bench.revisions --after-matmul``: ``median_us`` runs ``before`` ahead of every
        call, outside the time it takes."""
        import time

        from bench import revisions

        events = []
        revisions.median_us(lambda: events.append("call"), 3,
                            lambda: (events.append("before"), time.sleep(0.05)))
        assert events == ["before", "call"] * 3
        assert revisions.median_us(lambda: None, 3, lambda: time.sleep(0.05)) < 0.04e6

    def test_revisions_leaves_this_checkouts_ops_in_place(self, tmp_path):
        """``python -m bench.revisions HEAD --after-matmul 8`` on a tiny shape: a row per mode
        with both medians and their ratio. The other revision is imported in the same
        process; its torch.library ops, defined again as ``fusedce::...``, replaced this
        checkout's (and destroyed their library, which crashed a later ``torch.compile``
        in the test run). They live under the revision's own namespace now."""
        if not (REPO_ROOT / ".git").exists():
            pytest.skip("needs a git checkout (git archive)")
        script = tmp_path / "rev.py"
        script.write_text(
            "import sys, torch, fusedce\n"
            "from fusedce import _loss\n"
            "from bench import revisions\n"
            "revisions.main(['HEAD', '--shapes', '4x10', '--repeats', '3', '--rounds', '1',\n"
            "                '--after-matmul', '8'])\n"
            "calls, forward = [], _loss.forward\n"
            "_loss.forward = lambda *a: calls.append(1) or forward(*a)\n"
            "x = torch.randn(4, 10, 1)\n"
            "t = torch.randint(0, 10, (4, 1))\n"
            "torch.ops.fusedce.ce_forward(x, t, None, -100, 0.0, 'mean', 'torch', True,\n"
            "                             1.0, None, 0.0, False)\n"
            "print('this checkout ops:', len(calls))\n"
            "print('namespaces:', sorted(n for n in dir(torch.ops) if n.startswith('fusedce')))\n")
        out = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=checkout_env(),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["4x10"]]
        assert [r[1] for r in rows] == ["default", "inplace", "hooks", "no_grad"]
        assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
        assert "this checkout ops: 1" in out.stdout
        spaces = out.stdout.split("namespaces:")[1]
        assert "'fusedce'" in spaces and "'fusedce_" in spaces

    @pytest.mark.slow
    def test_distributed_errors_prints_each_cases_agreement(self):
        """``python -m bench.distributed_errors``: a case of tests/test_distributed.py run on
        its gloo processes, one line of its largest errors; an unknown id is refused."""
        cmd = [sys.executable, "-m", "bench.distributed_errors", "mean", "shift-1000"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                             env=checkout_env(), timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = {line.split(" (")[0]: line for line in out.stdout.splitlines()}
        for case in ("mean", "shift-1000"):
            errs = dict(part.split() for part in lines[case].split(": ")[1].split(", "))
            assert set(errs) == {"loss", "grad"}, lines[case]
            assert all(0 <= float(v) < 2e-5 for v in errs.values()), lines[case]
        bad = subprocess.run([sys.executable, "-m", "bench.distributed_errors", "no-such"],
                             capture_output=True, text=True, cwd=REPO_ROOT,
                             env=checkout_env(), timeout=120)
        assert bad.returncode == 2 and "unknown cases: no-such" in bad.stderr

    def test_script_ablation_runs_and_restores_the_scripts(self, monkeypatch):
        """``python -m bench.script_ablation`` on a tiny shape run by 2 workers: a row per dtype
        and mode with both timings, and the scripted loops in place again afterwards."""
        from bench import script_ablation

        monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
        monkeypatch.setattr(pool, "max_workers", lambda: 2)
        monkeypatch.setattr(chunks, "_SCRIPTED", {})
        rows = script_ablation.run(tokens=8, vocab=257, repeats=1)
        assert [(r[0], r[1]) for r in rows] == [(d, c) for d in ("fp32", "bf16")
                                                for c in ("fusedce", "fusedce_inplace")]
        assert all(r[2] > 0 and r[3] > 0 for r in rows)
        for fn in (chunks.fwd_chunks, chunks.bwd_chunks):
            assert isinstance(chunks._SCRIPTED[fn], torch.jit.ScriptFunction)
        assert "| bf16 | fusedce_inplace |" in script_ablation.report(rows, 8, 257, 1)
