"""`olmo-fast`: one entry point, one module of this package per subcommand (each exposes
`add_parser(subparsers)`). The CLI sits on top of the library: no library module imports `olmo_fast.cli`."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines `add_parser(subparsers)`; the parser's `run` default does the work.
SUBCOMMANDS = {
    "info": "olmo_fast.cli.info",
    "train": "olmo_fast.cli.train",
    "prepare-data": "olmo_fast.cli.prepare_data",
    "bench": "olmo_fast.cli.bench",
    "generate": "olmo_fast.cli.generate",
    "eval": "olmo_fast.cli.eval",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olmo-fast",
        description="Fast kernels, training and generation for OLMo models. `olmo-fast COMMAND --help` for more.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
