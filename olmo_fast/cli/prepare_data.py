"""`olmo-fast prepare-data INPUT... -o FOLDER`: tokenize text / JSONL into OLMo's token files (and label masks).
The work is `olmo_fast.train.prepare_data`'s (its module docstring is the `--help` text); this module checks the
arguments before any work, reports, and picks the exit status (2: bad input or tokenizer; 1: a failed write).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..train import prepare_data
from ..train.documents import InputError, check_input, read_documents


def _prepare(args: argparse.Namespace) -> prepare_data.Summary:
    """Check the inputs, the output folder and the tokenizer before any work, then tokenize."""
    from ..tokenizer import EOS_TOKEN, load_tokenizer

    inputs = [Path(p) for p in args.inputs]
    for path in inputs:
        check_input(path)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output {out_dir}: exists and is not a folder")
    tokenizer = load_tokenizer(args.tokenizer)
    eos = args.eos if args.eos is not None else tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise InputError(f"the tokenizer has no {EOS_TOKEN} token: pass --eos ID")
    documents = (doc for path in inputs for doc in read_documents(path, args.field))
    return prepare_data.write_token_files(documents, out_dir, tokenizer, eos, args.dtype)


def run(args: argparse.Namespace) -> int:
    from ..tokenizer import TokenizerError

    try:
        summary = _prepare(args)
    except (InputError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder we may not write to
        print(f"error: {err.strerror or err}: {err.filename or args.output}", file=sys.stderr)
        return 1
    skipped = f", {summary.skipped:,} empty ones skipped" if summary.skipped else ""
    print(f"wrote {summary.tokens:,} tokens ({summary.documents:,} documents{skipped}, {summary.dtype}) to "
          + ", ".join(summary.files))
    if summary.changed_cuts:
        print(f"warning: {summary.changed_cuts} of the {summary.cuts} places where long documents were cut into "
              f"pieces changed the tokens there (a tokenizer that is not split-invariant, or a stretch of "
              f"{2 * prepare_data.PIECE_CHARS:,} characters without a letter or digit followed by whitespace)",
              file=sys.stderr)
    paths = "--data.paths=[" + summary.files[0] + "]"
    masks = f" --data.label_mask_paths=[{summary.files[1]}]" if len(summary.files) > 1 else ""
    dtype = "" if summary.dtype == "uint16" else f" --data.memmap_dtype={summary.dtype}"
    print(f"train on it: olmo-fast train {paths}{masks}{dtype}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prepare-data", help="tokenize text/JSONL into OLMo token files",
                       description=prepare_data.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help=".txt, .jsonl or .jsonl.gz files")
    p.add_argument("-o", "--output", required=True, help="output folder (input_ids.npy, label_mask.npy)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or a folder holding one (default: OLMo's)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--dtype", choices=["uint16", "uint32"], default=None, help="token dtype (default: by vocab)")
    p.add_argument("--eos", type=int, default=None, help="EOS id appended to each document (default: the tokenizer's)")
    p.set_defaults(run=run)
