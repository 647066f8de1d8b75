"""The input files of `olmo-fast prepare-data` read as documents, every unusable one named by file and line.

A `.txt` file (any name not ending in `.json[l][.gz]`) is one document, read in blocks (never whole) as UTF-8
with universal newlines. A JSON-lines file (`.jsonl`, `.json`, either gzipped) holds one JSON object per line
with a string `text` field (or another `field`), or string `prompt` and `completion` fields; blank lines are
skipped. Memory holds one line (or one block) at a time.
"""
from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

BLOCK_BYTES = 1 << 16  # bytes read at a time from a .txt file
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")

# (prompt, text): the prompt is not scored ("" for plain text); the text is a string or its blocks in order
Document = tuple[str, str | Iterable[str]]


class InputError(ValueError):
    """Input that prepare-data cannot use; the message names the file (and line) where there is one."""


def check_input(path: Path) -> None:
    """Fail before any work on an input that is missing, not a file or empty."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, no text to tokenize")


def read_documents(path: Path, field: str = "text") -> Iterator[Document]:
    """The documents of one input file (see the module docstring for the formats)."""
    if path.name.endswith(JSON_SUFFIXES):
        return _json_documents(path, field)
    return iter([("", _text_blocks(path))])


def _text_blocks(path: Path) -> Iterator[str]:
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    line = 1
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(BLOCK_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                where = line + raw.count(b"\n", 0, max(err.start, 0))
                raise InputError(f"{path}:{where}: not UTF-8 text ({err.reason}): is it a binary file?") from None
            nul = text.find("\0")
            if nul >= 0:
                where = line + text.count("\n", 0, nul)
                raise InputError(f"{path}:{where}: a NUL character: this looks like a binary file, not text")
            line += text.count("\n")
            if text:
                yield text
            if not raw:
                return


def _json_documents(path: Path, field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.endswith(".gz") else open
    n = records = 0
    try:
        with opener(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise InputError(f"{path}:{n}: not UTF-8 text ({err.reason} at byte {err.start + 1} of the line)"
                                     ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{n}: not a JSON line ({err.msg} at column {err.colno})") from None
                try:
                    yield _document(record, field)
                except ValueError as err:
                    raise InputError(f"{path}:{n}: {err}") from None
                records += 1
    except (OSError, EOFError, zlib.error) as err:  # a gzip file that is corrupt or cut short
        raise InputError(f"{path}:{n + 1}: cannot read it ({err})") from None
    if records == 0:
        raise InputError(f"{path}: no JSON records, only blank lines")


def _document(record: object, field: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with a {field!r} field, got {_json_kind(record)}")
    if "prompt" in record and "completion" in record:
        return _string(record, "prompt"), _string(record, "completion")
    if field in record:
        return "", _string(record, field)
    raise ValueError(f"no {field!r} field (nor prompt + completion)")


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is {_json_kind(value)}, not a string")
    return value


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    kinds = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)
