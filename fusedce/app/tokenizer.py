"""GPT-2's tokenizer (tiktoken's ``gpt2`` encoding, 50,257 tokens), online or offline.

``tiktoken.get_encoding("gpt2")`` downloads GPT-2's merge ranks on first use (and caches
them). Where that is impossible, the same encoding is built from a local ``.tiktoken`` file of
the merge ranks (one ``base64-bytes rank`` pair a line, e.g. ``whisper/assets/gpt2.tiktoken``
of the MIT-licensed ``openai-whisper`` package). Where it is looked for, in this order:

1. the file passed as ``bpe_file`` (the demo's ``--tokenizer-file``);
2. the file named by the environment variable ``FUSEDCE_GPT2_BPE``;
3. ``shared/data/gpt2.tiktoken`` beside a source checkout of this repository (the project's
   CI and development layout; absent in an ordinary install);
4. tiktoken's own ``gpt2`` encoding (its download cache, else the network).

A named file that does not exist is an error (it is never silently skipped). If all four
fail, :class:`TokenizerUnavailable` says how to get either of the first two ways working.
"""

import os
from pathlib import Path

ENV_VAR = "FUSEDCE_GPT2_BPE"
VOCAB_SIZE = 50_257  # 50,256 merge ranks + <|endoftext|>
EOT = "<|endoftext|>"
EOT_ID = 50_256

# The repository root of a source checkout (an editable install): fusedce/tokenizer.py -> ..
_CHECKOUT_FILE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gpt2.tiktoken"


class TokenizerUnavailable(RuntimeError):
    """Neither a local GPT-2 ``.tiktoken`` file nor tiktoken's download is available."""


def _from_file(path):
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str

    path = Path(path).expanduser()
    if not path.is_file():
        raise TokenizerUnavailable(f"GPT-2 tokenizer file {str(path)!r} does not exist")
    ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    if len(ranks) != EOT_ID:
        raise TokenizerUnavailable(
            f"{str(path)!r} holds {len(ranks)} merge ranks, GPT-2 has "
            f"{EOT_ID}: not GPT-2's gpt2.tiktoken"
        )
    # The split pattern and special token of tiktoken's own "gpt2" encoding.
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: EOT_ID}
    )


def gpt2_encoding(bpe_file=None):
    """tiktoken's GPT-2 encoding (50,257 tokens, ``<|endoftext|>`` = 50256).

    ``bpe_file``: a local GPT-2 ``.tiktoken`` file to build it from without the network;
    by default ``$FUSEDCE_GPT2_BPE``, then a checkout's ``shared/data/gpt2.tiktoken``, then
    tiktoken's download. Raises :class:`TokenizerUnavailable` when none works.
    """
    named = bpe_file or os.environ.get(ENV_VAR)
    if named:
        return _from_file(named)
    if _CHECKOUT_FILE.is_file():
        return _from_file(_CHECKOUT_FILE)
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # requests' ConnectionError, HTTPError, a hash mismatch, ...
        raise TokenizerUnavailable(
            "could not load GPT-2's tokenizer: tiktoken.get_encoding('gpt2') failed to "
            f"download it ({type(err).__name__}: {err}).\n"
            "Either connect to the internet once (tiktoken caches the files), or point fusedce "
            "at a local copy of GPT-2's merge ranks, the file gpt2.tiktoken (for example "
            "whisper/assets/gpt2.tiktoken from the openai-whisper package on PyPI):\n"
            f"  - set the environment variable {ENV_VAR}=/path/to/gpt2.tiktoken, or\n"
            "  - pass --tokenizer-file /path/to/gpt2.tiktoken (gpt2_encoding(bpe_file=...) "
            "from Python)."
        ) from err
