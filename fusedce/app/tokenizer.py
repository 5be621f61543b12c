"""GPT-2's tokenizer (the token ids of tiktoken's ``gpt2`` encoding, 50,257 tokens), offline.

The encoding is built with tiktoken from a ``.tiktoken`` file of GPT-2's merge ranks (one
``base64-bytes rank`` pair a line) and tiktoken's own split pattern and special token. The
file is looked for in this order:

1. the file passed as ``bpe_file`` (``--tokenizer-file`` of ``fusedce demo`` and ``train``);
2. the file named by the environment variable ``FUSEDCE_GPT2_BPE``;
3. the copy shipped in the package, ``fusedce/app/data/gpt2.tiktoken`` (see the README.md
   beside it for its source, licence and sha256).

Nothing is downloaded and nothing outside the package is looked for: tiktoken's own
``get_encoding("gpt2")``, which fetches its files from the internet on first use, is never
called. A named file that does not exist or is not GPT-2's merge ranks is an error (never
silently replaced by the packaged copy), raised as :class:`TokenizerUnavailable`.
"""

import base64
import binascii
import hashlib
import os
from pathlib import Path

ENV_VAR = "FUSEDCE_GPT2_BPE"
VOCAB_SIZE = 50_257  # 50,256 merge ranks + <|endoftext|>
EOT = "<|endoftext|>"
EOT_ID = 50_256

# GPT-2's merge ranks, shipped with the package (fusedce/app/data/README.md).
_PACKAGED_FILE = Path(__file__).resolve().parent / "data" / "gpt2.tiktoken"
_PACKAGED_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

_HOW_TO_NAME_A_FILE = (
    f"set the environment variable {ENV_VAR}=/path/to/gpt2.tiktoken, or pass "
    "--tokenizer-file /path/to/gpt2.tiktoken (gpt2_encoding(bpe_file=...) from Python)"
)


class TokenizerUnavailable(RuntimeError):
    """No usable GPT-2 ``.tiktoken`` file: a named one is missing or not GPT-2's merge ranks,
    or the packaged copy is missing or damaged."""


def _parse_ranks(data, where):
    """``{token bytes: rank}`` from the contents of a ``.tiktoken`` file, read as
    ``tiktoken.load.load_tiktoken_bpe`` reads it (which would also copy a local file into
    tiktoken's download cache); raises :class:`TokenizerUnavailable` on anything else."""
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as err:
            shown = line[:60] + (b"..." if len(line) > 60 else b"")
            raise TokenizerUnavailable(
                f"{where} is not a .tiktoken file of GPT-2's merge ranks: line {number} "
                f"({shown!r}) is not a 'base64-bytes rank' pair ({err})"
            ) from None
    if len(ranks) != EOT_ID or set(ranks.values()) != set(range(EOT_ID)):
        raise TokenizerUnavailable(
            f"{where} holds {len(ranks)} merge ranks, GPT-2 has {EOT_ID} "
            f"(ranks 0..{EOT_ID - 1}): not GPT-2's gpt2.tiktoken"
        )
    return ranks


def _encoding(ranks):
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    # The split pattern and special token of tiktoken's own "gpt2" encoding.
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: EOT_ID}
    )


def _from_named_file(path):
    path = Path(path).expanduser()
    if not path.is_file():
        raise TokenizerUnavailable(f"GPT-2 tokenizer file {str(path)!r} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        message = f"cannot read GPT-2 tokenizer file {str(path)!r}: {err}"
        raise TokenizerUnavailable(message) from err
    try:
        ranks = _parse_ranks(data, f"GPT-2 tokenizer file {str(path)!r}")
    except TokenizerUnavailable as err:
        raise TokenizerUnavailable(f"{err}; name GPT-2's gpt2.tiktoken with --tokenizer-file "
                                   f"or ${ENV_VAR}, or name none for the packaged copy") from None
    return _encoding(ranks)


def _from_packaged_file():
    path = _PACKAGED_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TokenizerUnavailable(
            f"GPT-2's merge ranks, shipped with fusedce as {str(path)!r}, cannot be read "
            f"({err}): reinstall fusedce, or {_HOW_TO_NAME_A_FILE}"
        ) from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != _PACKAGED_SHA256:
        raise TokenizerUnavailable(
            f"GPT-2's merge ranks shipped with fusedce, {str(path)!r}, are damaged (sha256 "
            f"{digest}, expected {_PACKAGED_SHA256}): reinstall fusedce, or {_HOW_TO_NAME_A_FILE}"
        )
    return _encoding(_parse_ranks(data, repr(str(path))))


def gpt2_encoding(bpe_file=None):
    """GPT-2's encoding as a ``tiktoken.Encoding`` (50,257 tokens, ``<|endoftext|>`` =
    50256; the token ids of ``tiktoken.get_encoding("gpt2")``), built without a network.

    ``bpe_file``: a GPT-2 ``.tiktoken`` file to build it from; by default
    ``$FUSEDCE_GPT2_BPE``, else the copy shipped in the package. Raises
    :class:`TokenizerUnavailable` when the file is missing or not GPT-2's merge ranks.
    """
    if bpe_file:
        return _from_named_file(bpe_file)
    named = os.environ.get(ENV_VAR)
    if named:
        try:
            return _from_named_file(named)
        except TokenizerUnavailable as err:  # say where the name came from
            raise TokenizerUnavailable(f"{err} (named by ${ENV_VAR})") from None
    return _from_packaged_file()
