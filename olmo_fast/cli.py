"""`olmo-fast`: one entry point, one module per subcommand (each exposes `add_parser(subparsers)`)."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines `add_parser(subparsers)`; the parser's `run` default does the work.
SUBCOMMANDS = {
    "info": "olmo_fast.info",
    "train": "olmo_fast.train.cli",
    "prepare-data": "olmo_fast.train.prepare_data",
    "bench": "olmo_fast.bench_cli",
    "generate": "olmo_fast.generate_cli",
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


if __name__ == "__main__":
    sys.exit(main())
