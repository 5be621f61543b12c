"""GPT-2's merge ranks shipped in the package (fusedce/app/data/): the very file of its
stated source, documented beside it, and read as tiktoken reads it."""

import hashlib
import re

import tiktoken.load

from fusedce.app import tokenizer

# /work/shared/data/README.md and fusedce/app/data/README.md: whisper/assets/gpt2.tiktoken
# of the openai-whisper sdist 20250625 on PyPI.
SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
SIZE = 835_554


def test_packaged_file_is_the_stated_one():
    data = tokenizer._PACKAGED_FILE.read_bytes()
    assert len(data) == SIZE
    assert hashlib.sha256(data).hexdigest() == SHA256
    assert tokenizer._PACKAGED_SHA256 == SHA256  # what the loader checks on every read


def test_notice_beside_it_gives_source_licence_and_hash():
    notice = (tokenizer._PACKAGED_FILE.parent / "README.md").read_text(encoding="utf-8")
    assert SHA256 in notice
    assert "openai-whisper" in notice and "whisper/assets/gpt2.tiktoken" in notice
    assert "MIT License" in notice and re.search(r"Copyright \(c\) \d{4} OpenAI", notice)


def test_read_as_tiktoken_reads_it(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken copies no file into a cache
    theirs = tiktoken.load.load_tiktoken_bpe(str(tokenizer._PACKAGED_FILE))
    ours = tokenizer._parse_ranks(tokenizer._PACKAGED_FILE.read_bytes(), "the packaged file")
    assert ours == theirs
    assert sorted(ours.values()) == list(range(tokenizer.EOT_ID))
