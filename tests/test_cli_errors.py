"""Bad input to ``fusedce`` (and ``python -m bench``) ends with one line on stderr naming the
problem, exit status 2, no traceback, and before any long work.

Most cases run the command in process (``cli.main`` with capsys); a few run it as a fresh
``python -m fusedce`` process (marked slow). The network is never touched: the tokenizer is
GPT-2's merge-ranks file shipped in the package, or a bad file made here.
"""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, checkout_env

import fusedce
from fusedce.app import cli, demo, tokenizer, train

BPE_FILE = tokenizer._PACKAGED_FILE  # shipped in the package: never missing
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture
def no_work(monkeypatch):
    """The tokenizer is GPT-2's, offline; building a model or training is a test failure
    (every error must come before the long work)."""
    if not BPE_FILE.is_file():
        pytest.skip(f"GPT-2 merge ranks not found at {BPE_FILE}")
    monkeypatch.setenv(tokenizer.ENV_VAR, str(BPE_FILE))

    def work(*args, **kwargs):
        raise AssertionError("the long work started before the error")

    monkeypatch.setattr(demo, "build_model", work)
    monkeypatch.setattr(train, "build_model", work)
    monkeypatch.setattr(train, "train", work)
    monkeypatch.setattr(train, "train_together", work)


def run(argv, capsys):
    """``(status, stdout, stderr)`` of ``fusedce ARGV`` in process."""
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *words):
    assert status == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err  # argparse puts its usage lines above; nothing else
    assert err.rstrip("\n").splitlines()[-1] == errors[0]
    assert errors[0].startswith(("fusedce: error:", "fusedce demo: error:",
                                 "fusedce train: error:")), errors[0]
    for word in words:
        assert word in errors[0], (word, errors[0])


@pytest.fixture
def files(tmp_path):
    """Paths of the bad files the cases name."""
    (tmp_path / "garbage.tiktoken").write_text("garbage\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "short.txt").write_text("A short text of a few tokens.\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1") * 100)
    return tmp_path


CASES = [
    # (id, argv ({tmp}: the files fixture's folder), words the message must hold)
    ("garbage-tokenizer-file", ["demo", "--tokenizer-file", "{tmp}/garbage.tiktoken"],
     ["tokenizer file", "--tokenizer-file"]),
    ("garbage-tokenizer-file-train", ["train", "--tokenizer-file", "{tmp}/garbage.tiktoken",
                                      "--out", "{tmp}/out"], ["tokenizer file"]),
    ("missing-tokenizer-file", ["demo", "--tokenizer-file", "{tmp}/absent.tiktoken"],
     ["does not exist"]),
    pytest.param("device-cuda-without-cuda", ["demo", "--device", "cuda"],
                 ["CUDA is not available", "--device cpu"], marks=NO_CUDA),
    pytest.param("train-device-cuda-without-cuda", ["train", "--device", "cuda:0"],
                 ["CUDA is not available"], marks=NO_CUDA),
    ("device-not-a-device", ["demo", "--device", "gpu"], ["'gpu'", "cpu, cuda"]),
    ("repeats-0", ["demo", "--repeats", "0"], ["--repeats", "at least 1"]),
    ("repeats-negative", ["demo", "--repeats", "-3"], ["--repeats", "at least 1"]),
    ("repeats-not-a-number", ["demo", "--repeats", "many"], ["--repeats", "'many'"]),
    ("empty-text", ["demo", ""], ["''", "needs 2"]),
    ("one-token-text", ["demo", "Hello"], ["'Hello'", "needs 2"]),
    ("text-too-long-for-the-model", ["demo", "--size", "tiny", "word " * 300],
     ["model 'tiny'", "--size"]),
    ("unknown-size-demo", ["demo", "--size", "huge"], ["--size", "huge"]),
    ("unknown-size-train", ["train", "--size", "huge"], ["--size", "huge"]),
    ("steps-0", ["train", "--steps", "0"], ["--steps", "at least 1"]),
    ("batch-size-0", ["train", "--batch-size", "0"], ["--batch-size", "at least 1"]),
    ("batch-size-negative", ["train", "--batch-size", "-2"], ["--batch-size", "at least 1"]),
    ("seq-len-0", ["train", "--seq-len", "0"], ["--seq-len", "at least 1"]),
    ("lr-0", ["train", "--lr", "0"], ["--lr", "above 0"]),
    ("lr-negative", ["train", "--lr", "-0.001"], ["--lr", "above 0"]),
    ("lr-nan", ["train", "--lr", "nan"], ["--lr", "above 0"]),
    ("seed-too-large", ["train", "--seed", str(2**64)], ["--seed", "64 bits"]),
    ("missing-text-file", ["train", "--text-file", "{tmp}/absent.txt", "--out", "{tmp}/out"],
     ["--text-file", "no such file"]),
    ("text-file-is-a-folder", ["train", "--text-file", "{tmp}", "--out", "{tmp}/out"],
     ["--text-file", "folder"]),
    ("text-file-not-utf8", ["train", "--text-file", "{tmp}/latin1.txt", "--out", "{tmp}/out"],
     ["--text-file", "UTF-8"]),
    ("seq-len-longer-than-the-text", ["train", "--text-file", "{tmp}/short.txt", "--seq-len",
                                      "64", "--out", "{tmp}/out"], ["--seq-len", "tokens"]),
    ("out-under-a-file", ["train", "--out", "{tmp}/a-file/out"], ["--out", "not a folder"]),
    ("out-is-a-file", ["train", "--out", "{tmp}/a-file"], ["--out", "not a folder"]),
    ("inplace-with-torch-loss", ["train", "--loss", "torch", "--inplace"], ["--inplace"]),
    ("backend-with-torch-loss", ["train", "--loss", "torch", "--backend", "triton"],
     ["--backend triton", "fusedce option"]),
    ("unknown-option", ["train", "--stepz", "3"], ["--stepz"]),
    ("misspelt-subcommand", ["trian"], ["'trian'", "did you mean 'train'", "demo, train"]),
    ("misspelt-demo", ["dmeo", "some", "text"], ["'dmeo'", "did you mean 'demo'"]),
    ("unknown-first-word", ["hello", "world"], ["'hello'", "fusedce demo TEXT"]),
    ("text-without-subcommand-after-options", ["--size", "tiny", "hello", "world"],
     ["fusedce demo TEXT"]),
]


@pytest.mark.parametrize("argv, words", [
    pytest.param(*c[1:], id=c[0]) if not hasattr(c, "values")
    else pytest.param(*c.values[1:], id=c.values[0], marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_and_status_2(argv, words, files, no_work, capsys):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    status, _, err = run(argv, capsys)
    assert_one_line_error(status, err, *words)
    assert not (files / "out").exists()  # nothing written


@pytest.mark.parametrize("command", ["demo", "train"])
def test_unknown_option_shows_the_subcommands_usage(command, no_work, capsys):
    """``fusedce demo --text x`` printed the top level's usage, which lists no option of
    demo's (found in review)."""
    status, _, err = run([command, "--nope", "x"], capsys)
    assert_one_line_error(status, err, "unrecognized arguments", "--nope")
    assert err.startswith(f"usage: fusedce {command} [-h]"), err


def test_tokenizer_file_from_the_environment_is_named(tmp_path, monkeypatch, capsys):
    """A missing file named by $FUSEDCE_GPT2_BPE: the message says where the name came
    from (the user may not know it is set)."""
    monkeypatch.setenv(tokenizer.ENV_VAR, str(tmp_path / "absent.tiktoken"))
    status, _, err = run(["demo"], capsys)
    assert_one_line_error(status, err, "does not exist", f"(named by ${tokenizer.ENV_VAR})")


def test_unwritable_out_is_refused_before_training(tmp_path, no_work, capsys, monkeypatch):
    # root can write anywhere: make the write test itself fail, as a read-only folder would
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(train.tempfile, "TemporaryFile", refuse)
    status, _, err = run(["train", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(status, err, "--out", "Permission denied")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ["tqdm", "matplotlib"])
def test_missing_extra_is_named_before_any_work(module, tmp_path, no_work, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    status, _, err = run(["train", "--out", str(tmp_path / "out")], capsys)
    # the packages themselves: fusedce is not on PyPI, "fusedce[demo]" would not resolve
    assert_one_line_error(status, err, module, f"pip install {module} (in a checkout: "
                                               f'pip install -e ".[demo]")')


def test_tokenizer_unavailable_is_one_line(tmp_path, monkeypatch, capsys):
    # the offline error of the tokenizer module is several lines: printed as one
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
    # only a broken install lacks the packaged merge ranks
    monkeypatch.setattr(tokenizer, "_PACKAGED_FILE", tmp_path / "absent.tiktoken")
    status, _, err = run(["demo"], capsys)
    assert_one_line_error(status, err, tokenizer.ENV_VAR, "--tokenizer-file")


def test_version(capsys):
    status, out, err = run(["--version"], capsys)
    assert status == 0 and err == ""
    assert out == f"fusedce {fusedce.__version__}\n"


@pytest.mark.parametrize("argv, expected", [
    ([], ["demo"]),  # `fusedce` alone: the demo on its default texts
    (["--size", "tiny"], ["demo", "--size", "tiny"]),  # options only: the demo's
    (["demo", "a", "b"], ["demo", "a", "b"]),
    (["train", "--steps", "3"], ["train", "--steps", "3"]),
])
def test_subcommand_routing(argv, expected):
    assert cli._explicit(argv, cli._parser())[0] == expected


def _subparsers():
    parser = cli._parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


@pytest.mark.parametrize("command", ["demo", "train"])
def test_every_option_has_meaning_and_default(command):
    _, subparsers = _subparsers()
    for action in subparsers[command]._actions:
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, action.option_strings or action.dest


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["train", "--help"]])
def test_help_has_defaults_and_no_rest_markup(argv, capsys):
    status, out, _ = run(argv, capsys)
    assert status == 0
    assert "``" not in out and ":class:" not in out
    if argv[0] != "--help":
        assert "(default:" in out
    if argv[0] == "train":
        for option, default in (("--steps", "200"), ("--batch-size", "8"), ("--seq-len", "64"),
                                ("--lr", "0.003"), ("--seed", "0"), ("--backend", "auto")):
            assert option in out and f"(default: {default})" in out, option


# Through a fresh process: what a user sees, exit status included.
SUBPROCESS_CASES = [
    pytest.param(["trian"], "did you mean 'train'", id="misspelt-subcommand"),
    pytest.param(["train", "--steps", "0"], "--steps", id="steps-0"),
    pytest.param(["demo", "--device", "cuda"], "CUDA is not available", marks=NO_CUDA,
                 id="device-cuda-without-cuda"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, words", SUBPROCESS_CASES)
def test_bad_input_from_the_command_line(argv, words, tmp_path):
    env = checkout_env()
    env[tokenizer.ENV_VAR] = str(BPE_FILE)
    proc = subprocess.run([sys.executable, "-m", "fusedce", *argv], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, words)
    assert proc.stdout == ""


@pytest.mark.slow
def test_version_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fusedce", "--version"], env=checkout_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"fusedce {fusedce.__version__}"


@pytest.mark.parametrize("argv, words", [
    pytest.param(["--device", "cuda"], "0 CUDA device", marks=NO_CUDA, id="cuda-without-cuda"),
    pytest.param(["--device", "gpu"], "not a device", id="not-a-device"),
    pytest.param(["--device", "meta"], "cpu or cuda", id="meta"),
    pytest.param(["--warmup", "0"], "--warmup", id="warmup-0"),
])
def test_bench_bad_options_are_usage_errors(argv, words, capsys):
    """``python -m bench --device cuda`` on a CPU build of torch asserted deep in its first
    case, and ``--warmup 0`` timed torch.compile's compilation as a call (found in review):
    now argparse's one-line usage errors, before any work."""
    from bench import __main__ as bench_main

    with pytest.raises(SystemExit) as exit_:
        bench_main._parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err.splitlines()[-1], err


class TestBenchOutput:
    """``python -m bench`` writes where it is told, and by default not into bench/results/,
    the tracked figures the README cites."""

    RESULTS = REPO_ROOT / "bench" / "results"
    TINY = ["--tokens", "8", "--vocab", "300", "--dtypes", "fp32", "--passes", "fwd_bwd",
            "--cases", "eager,fusedce", "--repeats", "1", "--warmup", "1", "--memory", "none"]

    def _hashes(self):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.RESULTS.iterdir())}

    def test_default_out_is_untracked(self):
        from bench import __main__ as bench_main

        out = bench_main._parse_args([]).out
        assert os.path.realpath(out) == os.path.realpath(REPO_ROOT / "bench" / "out")
        assert os.path.realpath(out) != os.path.realpath(self.RESULTS)
        ignored = subprocess.run(["git", "check-ignore", "-q", "bench/out/ce_cpu.csv"],
                                 cwd=REPO_ROOT)
        assert ignored.returncode == 0, "bench/out/ is not in .gitignore"

    def test_out_is_where_the_user_says(self, tmp_path):
        from bench import __main__ as bench_main

        assert bench_main._parse_args(["--out", str(tmp_path / "mine")]).out == str(
            tmp_path / "mine")
        assert bench_main._parse_args(["--out", "bench/results"]).out == "bench/results"

    def test_script_ablation_default_out_is_untracked(self):
        from bench import script_ablation

        out = script_ablation.parse_args([]).out
        assert os.path.realpath(out) == os.path.realpath(REPO_ROOT / "bench" / "out")

    def test_a_run_leaves_bench_results_alone(self, tmp_path, monkeypatch, capsys):
        from bench import __main__ as bench_main

        before = self._hashes()
        monkeypatch.setattr(bench_main, "DEFAULT_OUT", str(tmp_path / "default"))
        monkeypatch.chdir(tmp_path)
        bench_main.main(self.TINY)
        assert self._hashes() == before
        assert sorted(p.name for p in (tmp_path / "default").iterdir()) == [
            "ce_cpu.csv", "ce_cpu.md", "ce_cpu.png"]

    @pytest.mark.parametrize("bad", ["file", "under-a-file"])
    def test_unwritable_out_is_refused_before_the_sweep(self, bad, tmp_path, capsys):
        from bench import __main__ as bench_main

        (tmp_path / "f").write_text("")
        out = tmp_path / "f" if bad == "file" else tmp_path / "f" / "sub"
        with pytest.raises(SystemExit) as exc:
            bench_main._parse_args([*self.TINY, "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "not a folder" in err.splitlines()[-1]

    def test_missing_extra_is_named(self, monkeypatch, capsys):
        from bench import __main__ as bench_main

        monkeypatch.setitem(sys.modules, "tqdm", None)
        with pytest.raises(SystemExit) as exc:
            bench_main._parse_args(self.TINY)
        assert exc.value.code == 2
        assert 'pip install tqdm (or: pip install -e ".[bench]")' in capsys.readouterr().err


def test_shortest_text_for_a_window():
    """A text of ``seq_len + 1`` tokens holds one window (its inputs and their next tokens),
    which ``sample_batch`` draws; one token fewer is refused with the longest ``--seq-len``
    that works (it asked for one token more than needed, and named one too few)."""
    tokens = torch.arange(10)
    train.check_windows(10, 9)
    x, y = train.sample_batch(tokens, 2, 9, torch.Generator().manual_seed(0))
    assert torch.equal(x, tokens[:9].expand(2, 9)) and torch.equal(y, tokens[1:].expand(2, 9))
    with pytest.raises(cli.UsageError, match="use --seq-len 9 or less"):
        train.check_windows(10, 10)
