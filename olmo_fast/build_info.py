"""The record `pip install` leaves of the compiled extension olmo_fast._C (`csrc/build_extension.py` writes
it): whether it was built, for which GPU runtime and architectures, and why not. A leaf module: the "cpp"
backend's provider (`ops/_cpp_kernels.py`) reads it to say why the extension does not load, and
`environment.py` (`olmo-fast info`) shows it.
"""
from __future__ import annotations

import json
import os

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def build_info() -> dict:
    """What `pip install` built of olmo_fast._C, and why not (the JSON record `olmo_fast/_build_info.json`)."""
    try:
        with open(RECORD) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"built": False, "reason": "no build record: install with `pip install --no-build-isolation -e .`"}
