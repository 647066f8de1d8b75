"""`olmo-fast prepare-data`: tokenize text / JSONL into OLMo's token files (and label masks).

Inputs: `.txt` files (each file one document), `.jsonl` / `.jsonl.gz` files with a `text` field per line, or
with `prompt` and `completion` fields (fine-tuning data: only the completion is scored). Every document is
followed by EOS (50279 for OLMo's tokenizer). Outputs in the output folder: `input_ids.npy` - headerless
uint16 (uint32 for vocabularies over 65536) token ids, as OLMo's memmap reader wants - and, when any record
has a prompt, `label_mask.npy`: one bool byte per token, False on prompt tokens.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

Document = tuple[str, str]  # (prompt, text): the prompt is not scored ("" for plain text)
_BATCH = 4096  # documents tokenized per call


def read_documents(path: Path, field: str = "text") -> Iterator[Document]:
    """Documents of one input file (see the module docstring for the formats)."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not a JSON line ({err})") from None
                if "prompt" in record and "completion" in record:
                    yield str(record["prompt"]), str(record["completion"])
                elif field in record:
                    yield "", str(record[field])
                else:
                    raise ValueError(f"{path}:{n}: no {field!r} field (nor prompt + completion)")
    else:
        yield "", path.read_text(encoding="utf-8")


def tokenize(documents: Iterable[Document], tokenizer, eos: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(token ids, label mask, documents) per batch of documents, each document followed by `eos`."""
    batch: list[Document] = []

    def flush() -> tuple[np.ndarray, np.ndarray, int]:
        prompts = tokenizer.encode_batch([p for p, _ in batch], add_special_tokens=False)
        texts = tokenizer.encode_batch([t for _, t in batch], add_special_tokens=False)
        ids, mask = [], []
        for p, t in zip(prompts, texts):
            ids += p.ids + t.ids + [eos]
            mask += [False] * len(p.ids) + [True] * (len(t.ids) + 1)
        count = len(batch)
        batch.clear()
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.bool_), count

    for doc in documents:
        batch.append(doc)
        if len(batch) == _BATCH:
            yield flush()
    if batch:
        yield flush()


def write_token_files(documents: Iterable[Document], out_dir: Path, tokenizer, eos: int,
                      dtype: str | None = None) -> dict:
    """Tokenize into `out_dir/input_ids.npy` (+ `label_mask.npy` when some tokens are masked); atomic per file.

    Returns a summary: tokens, documents, dtype, files written.
    """
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(dtype or ("uint16" if vocab <= 2**16 else "uint32"))
    if vocab > np.iinfo(dtype).max + 1:
        raise ValueError(f"a vocabulary of {vocab} does not fit {dtype.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ids_tmp, mask_tmp = out_dir / f".input_ids.{os.getpid()}", out_dir / f".label_mask.{os.getpid()}"
    tokens = docs = 0
    masked = False
    with open(ids_tmp, "wb") as ids_fh, open(mask_tmp, "wb") as mask_fh:
        for ids, mask, count in tokenize(documents, tokenizer, eos):
            ids.astype(dtype).tofile(ids_fh)
            mask.tofile(mask_fh)
            tokens += len(ids)
            docs += count
            masked |= not mask.all()
        for fh in (ids_fh, mask_fh):
            fh.flush()
            os.fsync(fh.fileno())
    if tokens == 0:
        ids_tmp.unlink()
        mask_tmp.unlink()
        raise ValueError("no documents to tokenize")
    files = [out_dir / "input_ids.npy"]
    os.replace(ids_tmp, files[0])
    if masked:
        files.append(out_dir / "label_mask.npy")
        os.replace(mask_tmp, files[1])
    else:
        mask_tmp.unlink()
    return {"tokens": tokens, "documents": docs, "dtype": dtype.name, "files": [str(f) for f in files]}


def run(args: argparse.Namespace) -> int:
    from ..tokenizer import EOS_TOKEN, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    eos = args.eos if args.eos is not None else tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise SystemExit(f"the tokenizer has no {EOS_TOKEN} token: pass --eos ID")
    inputs = [Path(p) for p in args.inputs]
    for path in inputs:
        if not path.is_file():
            raise SystemExit(f"input {path} does not exist")
    documents = (doc for path in inputs for doc in read_documents(path, args.field))
    summary = write_token_files(documents, Path(args.output), tokenizer, eos, args.dtype)
    print(f"wrote {summary['tokens']:,} tokens ({summary['documents']:,} documents, {summary['dtype']}) to "
          + ", ".join(summary["files"]))
    paths = "--data.paths=[" + summary["files"][0] + "]"
    masks = f" --data.label_mask_paths=[{summary['files'][1]}]" if len(summary["files"]) > 1 else ""
    dtype = "" if summary["dtype"] == "uint16" else f" --data.memmap_dtype={summary['dtype']}"
    print(f"train on it: olmo-fast train {paths}{masks}{dtype}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prepare-data", help="tokenize text/JSONL into OLMo token files",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help=".txt, .jsonl or .jsonl.gz files")
    p.add_argument("-o", "--output", required=True, help="output folder (input_ids.npy, label_mask.npy)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or a folder holding one (default: OLMo's)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--dtype", choices=["uint16", "uint32"], default=None, help="token dtype (default: by vocab)")
    p.add_argument("--eos", type=int, default=None, help="EOS id appended to each document (default: the tokenizer's)")
    p.set_defaults(run=run)
