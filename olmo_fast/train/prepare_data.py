"""Tokenize text / JSONL into OLMo's token files (and label masks).

Inputs (read by `documents.py`): `.txt` files (each file one document), `.jsonl` / `.jsonl.gz` files with a
`text` field per line, or with `prompt` and `completion` fields (fine-tuning data: only the completion is
scored). Every document is followed by EOS (50279 for OLMo's tokenizer); empty documents are skipped and
counted. Outputs in the output folder: `input_ids.npy` - headerless uint16 (uint32 for vocabularies over
65536) token ids, as OLMo's memmap reader wants - and, when any record has a prompt, `label_mask.npy`: one
bool byte per token, False on prompt tokens. Both are written to temporary files and renamed into place only
when the whole run succeeds: a failed or interrupted run leaves nothing behind.

Memory stays bounded whatever the length of a document: a text longer than 2 x PIECE_CHARS characters is
encoded in pieces of PIECE_CHARS to 2 x PIECE_CHARS characters, each cut right after a letter or digit that
whitespace follows. For byte-level BPE tokenizers whose pre-tokenizer never joins a letter or digit with the
whitespace after it (GPT-2, GPT-NeoX, OLMo's dolma-v1_5 and dolma2) such a place is a pre-token boundary that
NFC leaves alone, so the pieces' ids are exactly those of the whole text. A stretch of 2 x PIECE_CHARS
characters without such a place is cut where it stands. Every cut is checked (the 256 characters on each side
encoded together and apart) and the run reports any cut that changed the tokens there.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .documents import Document, InputError

PIECE_CHARS = 1 << 16  # characters per piece of a long text (~200 bytes of tokenizer memory per character)
_PIECES_PER_BATCH = 16  # a batch encodes at most this many pieces' worth of characters
_BATCH = 4096  # pieces and document ends per batch
_CUT_CONTEXT = 256  # characters each side of a cut encoded to check it
_CUT = re.compile(r"(?<=[^\W_])(?=\s)")  # a letter or digit, then whitespace

Piece = tuple[str, bool]  # (text, scored); None in a stream of pieces ends a document (its EOS)


@dataclass
class Summary:
    """What `write_token_files` wrote."""
    dtype: str
    tokens: int = 0
    documents: int = 0
    skipped: int = 0  # empty documents
    cuts: int = 0  # places where a long text was cut into pieces
    changed_cuts: int = 0  # cuts whose surrounding tokens differ from a whole-text encode
    files: list[str] = field(default_factory=list)


def split_text(blocks: Iterable[str], piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """The text made of `blocks` in pieces of at most 2 x `piece_chars` characters (see the module docstring)."""
    limit = 2 * piece_chars
    pending, start = "", 0
    for block in blocks:
        pending, start = pending[start:] + block, 0
        while len(pending) - start > limit:
            match = _CUT.search(pending, start + piece_chars, start + limit)
            cut = match.start() if match else start + limit
            yield pending[start:cut]
            start = cut
    if len(pending) > start:
        yield pending[start:]


def _cut_keeps_tokens(tokenizer, left: str, right: str) -> bool:
    """Whether the tokens around a cut between `left` and `right` are those of the uncut text."""
    a, b = left[-_CUT_CONTEXT:], right[:_CUT_CONTEXT]
    together, first, second = tokenizer.encode_batch([a + b, a, b], add_special_tokens=False)
    return together.ids == first.ids + second.ids


def _pieces(documents: Iterable[Document], tokenizer, piece_chars: int, summary: Summary) -> Iterator[Piece | None]:
    """Each document's prompt (not scored) and text (scored) in pieces, then None; empty documents skipped."""
    for prompt, text in documents:
        empty = True
        for part, scored in ((prompt, False), (text, True)):
            previous = None
            for piece in split_text([part] if isinstance(part, str) else part, piece_chars):
                if previous is not None:
                    summary.cuts += 1
                    summary.changed_cuts += not _cut_keeps_tokens(tokenizer, previous, piece)
                previous, empty = piece, False
                yield piece, scored
        if empty:
            summary.skipped += 1
        else:
            summary.documents += 1
            yield None


def _encode(batch: list[Piece | None], tokenizer, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and label mask of a batch of pieces."""
    encoded = iter(tokenizer.encode_batch([p[0] for p in batch if p is not None], add_special_tokens=False))
    ids, mask = [], []
    for piece in batch:
        piece_ids = [eos] if piece is None else next(encoded).ids
        ids.append(np.asarray(piece_ids, dtype=np.int64))
        mask.append(np.full(len(piece_ids), piece is None or piece[1]))
    return np.concatenate(ids), np.concatenate(mask)


def _tokenize(documents: Iterable[Document], tokenizer, eos: int, piece_chars: int,
              summary: Summary) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(token ids, label mask) per batch; each document followed by `eos`."""
    batch: list[Piece | None] = []
    chars = 0
    for piece in _pieces(documents, tokenizer, piece_chars, summary):
        batch.append(piece)
        chars += 0 if piece is None else len(piece[0])
        if len(batch) >= _BATCH or chars >= _PIECES_PER_BATCH * piece_chars:
            yield _encode(batch, tokenizer, eos)
            batch, chars = [], 0
    if batch:
        yield _encode(batch, tokenizer, eos)


def _missing_folders(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def write_token_files(documents: Iterable[Document], out_dir: Path, tokenizer, eos: int,
                      dtype: str | None = None, piece_chars: int | None = None) -> Summary:
    """Tokenize into `out_dir/input_ids.npy` (+ `label_mask.npy` when some tokens are masked); texts longer
    than 2 x `piece_chars` (default PIECE_CHARS) characters are encoded in pieces (see the module docstring).

    Nothing is left in `out_dir` (not even the folder, if this call made it) when the input turns out bad
    (InputError) or the run fails or is interrupted. A `label_mask.npy` of an earlier run is removed when this
    run writes none: it would not fit the new token file.
    """
    vocab = tokenizer.get_vocab_size()
    np_dtype = np.dtype(dtype or ("uint16" if vocab <= 2**16 else "uint32"))
    if vocab > np.iinfo(np_dtype).max + 1:
        raise InputError(f"a vocabulary of {vocab} does not fit {np_dtype.name}")
    if not 0 <= eos < vocab:
        raise InputError(f"EOS id {eos} is outside the tokenizer's vocabulary of {vocab}")
    summary = Summary(dtype=np_dtype.name)
    piece_chars = piece_chars or PIECE_CHARS
    created = _missing_folders(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids_tmp, mask_tmp = out_dir / f".input_ids.{os.getpid()}", out_dir / f".label_mask.{os.getpid()}"
    ids_file, mask_file = out_dir / "input_ids.npy", out_dir / "label_mask.npy"
    masked = False
    try:
        with open(ids_tmp, "wb") as ids_fh, open(mask_tmp, "wb") as mask_fh:
            for ids, mask in _tokenize(documents, tokenizer, eos, piece_chars, summary):
                ids.astype(np_dtype).tofile(ids_fh)
                mask.tofile(mask_fh)
                summary.tokens += len(ids)
                masked |= not mask.all()
            for fh in (ids_fh, mask_fh):
                fh.flush()
                os.fsync(fh.fileno())
        if summary.tokens == 0:
            raise InputError("no text to tokenize: every document is empty")
        os.replace(ids_tmp, ids_file)
    except BaseException:
        for tmp in (ids_tmp, mask_tmp):
            tmp.unlink(missing_ok=True)
        for folder in created:
            with suppress(OSError):
                folder.rmdir()
        raise
    if masked:
        os.replace(mask_tmp, mask_file)
    else:
        mask_tmp.unlink()
        mask_file.unlink(missing_ok=True)
    summary.files = [str(ids_file)] + [str(mask_file)] * masked
    return summary
