"""The ``fusedce`` command (``cli``): ``fusedce demo`` scores GPT-2 tokens with fusedce's loss
against PyTorch's, ``fusedce train`` trains a small GPT-2-style model (``model``) on GPT-2
tokens (``tokenizer``). Built on the public API only; the library never imports this package.
"""
