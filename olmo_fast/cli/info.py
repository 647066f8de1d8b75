"""`olmo-fast info`: versions, devices, and which backends and compiled extensions are usable (and why not),
ending with a loud list of what did not load that this machine should have (`environment.problems`).
`--strict` exits 1 when that list is not empty.
"""
from __future__ import annotations

import argparse
import json

from ..environment import collect


def _describe_extension(ext: dict) -> str:
    if not ext.get("built"):
        return ext.get("reason", "not built")
    kind = "CPU only" if ext.get("gpu", "none") == "none" else f"CPU + {ext['gpu'].upper()} ({ext.get('archs', '?')})"
    text = f"built: {kind}" + (f", in {ext['seconds']} s" if "seconds" in ext else "")
    return text + (f"; {ext['gpu_error']}" if "gpu_error" in ext else "")


def _print(info: dict) -> None:
    for key, value in info.items():
        if key == "extension":
            print(f"{key:>12}: olmo_fast._C {_describe_extension(value)}")
        elif key == "install":
            print(f"{key:>12}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
        elif key not in ("backends", "problems"):
            print(f"{key:>12}: {value}")
    print("    backends:")
    for backend, entry in info["backends"].items():
        if "unavailable" in entry:
            print(f"      {backend:>7}: unavailable - {entry['unavailable']}")
        else:
            print(f"      {backend:>7}: {', '.join(entry['ops'])} on {', '.join(entry['devices'])}"
                  + (f" (LOAD ERROR: {entry['load_error']})" if "load_error" in entry else ""))
    if info["problems"]:
        print(f"\n*** WHAT DID NOT LOAD ({len(info['problems'])}) ***")
        for line in info["problems"]:
            print(f"  !!! {line}")
    else:
        print("    problems: none (everything this machine should have loaded)")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.save:
        with open(args.save, "w") as f:
            json.dump(info, f, indent=2)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print(info)
    return 1 if args.strict and info["problems"] else 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and available backends",
                       description="Print versions, devices, and which kernel backends are available and why not.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument("--save", metavar="PATH", help="also write the JSON to PATH")
    p.add_argument("--strict", action="store_true", help="exit 1 if anything this machine should have did not load")
    p.set_defaults(run=run)
