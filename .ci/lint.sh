#!/usr/bin/env bash
# CI lint: `ruff check` over the whole tree with the configuration in pyproject.toml ([tool.ruff]).
# ruff comes with the "test" / "all" extras (setup.py); PYTHON picks the interpreter (default: the CI venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-.venv/bin/python}" -m ruff check .
