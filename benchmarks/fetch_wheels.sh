#!/usr/bin/env bash
# Optional, on a machine with PyPI access: put the pure-Python Liger-Kernel wheel in .whl/ (ignored by git) so that
# a GPU machine without network compares against it. Carry .whl with the checkout; gpu_check.sh installs it first.
# (flash-attn ships as a source package that builds for tens of minutes, and apex is not on PyPI: bring your own
# wheels for them into .whl/ if you have matching ones.)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: -d .whl "liger-kernel==${LIGER_VERSION:-0.8.5}"
ls -l .whl
