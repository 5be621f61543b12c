"""The GPT-2 tokenizer loader: offline from a .tiktoken file, and its error without one.

Never touches the network: every test names the file (option or FUSEDCE_GPT2_BPE) or
replaces tiktoken's download by a failing stub.
"""

from pathlib import Path

import pytest

from fusedce.app import tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
BPE_FILE = REPO_ROOT.parent / "shared" / "data" / "gpt2.tiktoken"

# Ids of tiktoken's own "gpt2" encoding (/work/shared/data/README.md).
KNOWN = [
    pytest.param("every effort moves", [16833, 3626, 6100], id="words"),
    pytest.param("I really like", [40, 1107, 588], id="leading-capital"),
    pytest.param("Hello, world", [15496, 11, 995], id="punctuation"),
]


@pytest.fixture
def bpe_file():
    if not BPE_FILE.is_file():
        pytest.skip(f"GPT-2 merge ranks not found at {BPE_FILE} (shared/data beside the repo)")
    return BPE_FILE


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


@pytest.mark.parametrize("how", ["env", "option"])
@pytest.mark.parametrize("text, ids", KNOWN)
def test_known_encodings(bpe_file, monkeypatch, no_download, how, text, ids):
    if how == "env":
        monkeypatch.setenv(tokenizer.ENV_VAR, str(bpe_file))
        enc = tokenizer.gpt2_encoding()
    else:
        monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
        enc = tokenizer.gpt2_encoding(bpe_file=bpe_file)
    assert enc.encode(text) == ids
    assert enc.decode(ids) == text
    assert no_download == []  # the named file is used before any download is tried


def test_special_token_and_vocab(bpe_file):
    enc = tokenizer.gpt2_encoding(bpe_file=bpe_file)
    assert enc.n_vocab == tokenizer.VOCAB_SIZE == 50_257
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert enc.eot_token == tokenizer.EOT_ID
    # Unicode round-trips through the byte-level BPE.
    text = "naïve café – 日本語 🙂"
    assert enc.decode(enc.encode(text)) == text


def test_option_wins_over_env(bpe_file, monkeypatch, tmp_path):
    monkeypatch.setenv(tokenizer.ENV_VAR, str(tmp_path / "missing.tiktoken"))
    assert tokenizer.gpt2_encoding(bpe_file=bpe_file).encode("I really like") == [40, 1107, 588]


def test_named_missing_file_is_an_error(monkeypatch, no_download, tmp_path):
    missing = tmp_path / "nope.tiktoken"
    monkeypatch.setenv(tokenizer.ENV_VAR, str(missing))
    with pytest.raises(tokenizer.TokenizerUnavailable, match="does not exist"):
        tokenizer.gpt2_encoding()
    assert no_download == []  # a named file is never silently replaced by a download


def test_wrong_file_is_an_error(tmp_path):
    bad = tmp_path / "tiny.tiktoken"
    bad.write_text("YQ== 0\nYg== 1\n")  # two ranks: not GPT-2's
    with pytest.raises(tokenizer.TokenizerUnavailable, match="merge ranks"):
        tokenizer.gpt2_encoding(bpe_file=bad)


def test_offline_without_file_names_both_ways(monkeypatch, no_download, tmp_path):
    monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
    monkeypatch.setattr(tokenizer, "_CHECKOUT_FILE", tmp_path / "absent.tiktoken")
    with pytest.raises(tokenizer.TokenizerUnavailable) as err:
        tokenizer.gpt2_encoding()
    message = str(err.value)
    assert tokenizer.ENV_VAR in message and "--tokenizer-file" in message
    assert "ConnectionError" in message  # the cause is shown, not swallowed
    assert no_download == ["gpt2"]


def test_checkout_file_found_without_env(bpe_file, monkeypatch, no_download):
    # In a source checkout with shared/data beside it (CI), no variable is needed.
    if Path(tokenizer.__file__).resolve().parents[2] != REPO_ROOT:
        pytest.skip("fusedce is not imported from this checkout (not an editable install)")
    monkeypatch.delenv(tokenizer.ENV_VAR, raising=False)
    assert tokenizer._CHECKOUT_FILE == bpe_file.resolve()
    assert tokenizer.gpt2_encoding().encode("every effort moves") == [16833, 3626, 6100]
    assert no_download == []
