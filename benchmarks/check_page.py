"""The GPU check's results page (.md) and raw JSON, rebuilt from its run folder after every stage.

`gpu_check.sh` runs it as `python benchmarks/check_page.py ...` (no torch import: the page costs a tenth of a
second) before and after each stage, so a call killed at any point still returns a page and a JSON that say
which stage was running. Inputs: the stage records (JSON lines: a first line with the plan, then the latest
record of each stage wins) and each stage's output, named `part=path`:

    info=INFO.json bench=BENCH.json train=TRAIN.json decode=DECODE.json tests=TESTS.xml kernel-tests=KT.xml
    trainer=RUN_DIR (the `olmo-fast train` folder: metrics.jsonl, stepN/, hf/)

A missing or unreadable part is recorded as such. `--verify` (the dry run's own check) exits 1 unless every
planned stage ended, has its section on the page and its data in the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

try:
    from . import report
except ImportError:  # run as a file by gpu_check.sh: report.py lies beside it (and imports no torch)
    import report

# stage key -> (page section heading, JSON key of its data); the two install stages share a section.
SECTIONS = {"install": ("Install", None), "install-fallback": ("Install", None),
            "info": ("What did not load", "info"), "bench": ("Kernels", "bench"),
            "train": ("Training throughput", "train"), "decode": ("Generation throughput", "decode"),
            "tests": ("GPU tests", "tests"), "kernel-tests": ("Kernel tests", "kernel_tests"),
            "trainer": ("Trainer", "trainer")}
PARTS = {stage for stage, (_, key) in SECTIONS.items() if key}  # stages whose results are in the JSON
MAX_LISTED = 25  # failing tests listed on the page


def read_stages(path: Path) -> tuple[dict, list[dict]]:
    """The plan (first line) and the latest record of each planned stage, in plan order."""
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a record cut by a kill: the one before it stands
            continue
    plan, latest = lines[0], {}
    for rec in lines[1:]:
        latest[rec["key"]] = rec
    stages = [latest.get(s["key"], {**s, "status": "not started"}) for s in plan["plan"]]
    return plan, stages


def junit(path: Path) -> dict:
    """Counts and failures of a pytest --junitxml report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failed.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}",
                           "kind": bad.tag, "message": message[0][:300] if message else ""})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "seconds": round(sum(float(s.get("time", 0)) for s in suites), 1), "failed": failed}


def trainer_run(folder: Path) -> dict:
    """What a short `olmo-fast train` run (with a resume) left: checkpoints, logged steps, the last record."""
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    checkpoints = sorted((p.name for p in folder.glob("step*") if p.is_dir()), key=lambda n: int(n[4:] or 0))
    return {"checkpoints": checkpoints, "steps_logged": [r.get("step") for r in records],
            "last": records[-1] if records else None, "hf_export": (folder / "hf").is_dir()}


def load_part(name: str, path: Path):
    """A part's data, or {"missing": why}."""
    try:
        if name in ("tests", "kernel-tests"):
            return junit(path)
        if name == "trainer":
            if not path.is_dir():
                raise FileNotFoundError(f"no run folder {path}")
            return trainer_run(path)
        return json.loads(path.read_text())
    except (OSError, ValueError, ET.ParseError, KeyError) as err:
        return {"missing": f"{type(err).__name__}: {err}"}


def _cell(value) -> str:
    return "" if value is None else str(value)


def _status_line(stage: dict) -> str:
    text = f"**{stage['status']}**"
    if stage.get("seconds") is not None:
        text += f" in {stage['seconds']} s"
    if stage.get("limit_s") is not None:
        text += f" (limit {stage['limit_s']} s)"
    return text + (f": {stage['note']}" if stage.get("note") else "")


def problems(stages: list[dict], data: dict) -> list[str]:
    """Everything that went wrong, for the top of the page."""
    found = [f"stage {s['key']}: {s['status']}" + (f" ({s['note']})" if s.get("note") else "")
             for s in stages if s["status"] not in ("ok", "skipped", "not needed")]
    info = data.get("info") or {}
    found += [f"did not load: {p}" for p in info.get("problems", [])]
    bench = data.get("bench") or {}
    for r in report.failed_rows(bench.get("rows", [])):
        found.append(f"bench: {r['provider']} {r['op']} {r['shape']} {r['mode']}: {report.failure_text(r)}")
    for key in ("train", "decode"):
        for rec in (data.get(key) or {}).get("records", []):
            if "error" in rec:
                found.append(f"{key}: {rec.get('variant') or rec.get('provider')} "
                             f"{rec.get('model', '')} {rec.get('batch', '')}: {rec['error']}".replace("  ", " "))
    for key in ("tests", "kernel_tests"):
        result = data.get(key) or {}
        if result.get("failures") or result.get("errors"):
            found.append(f"{key}: {result['failures']} failed, {result['errors']} errors of {result['tests']}")
    return found


def _md_tests(title: str, result: dict | None) -> list[str]:
    if not result or "missing" in result:
        return [f"## {title}", "", f"(no report: {(result or {}).get('missing', 'not run')})", ""]
    lines = [f"## {title}", "", f"{result['passed']} passed, {result['failures']} failed, {result['errors']} errors, "
             f"{result['skipped']} skipped of {result['tests']} ({result['seconds']} s)", ""]
    for f in result["failed"][:MAX_LISTED]:
        lines.append(f"- {f['kind']}: `{f['test']}`: {f['message']}")
    if len(result["failed"]) > MAX_LISTED:
        lines.append(f"- ... and {len(result['failed']) - MAX_LISTED} more (see the log)")
    return lines + [""]


def _md_info(info: dict | None) -> list[str]:
    lines = ["## What did not load", ""]
    if not info or "missing" in info:
        return lines + [f"(no `olmo-fast info` record: {(info or {}).get('missing', 'not run')})", ""]
    found = info.get("problems", [])
    lines += [f"- **{p}**" for p in found] or ["Nothing: every backend and extension this machine should have loaded."]
    ext = info.get("extension", {})
    lines += ["", f"torch {info.get('torch')} (CUDA {info.get('torch_cuda')}, HIP {info.get('torch_hip')}), triton "
              f"{info.get('triton')}, devices {', '.join(info.get('devices', []))}; olmo_fast._C: "
              + ", ".join(f"{k} {v}" for k, v in ext.items()), ""]
    lines += ["Imports from: " + "; ".join(f"{k} {v}" for k, v in info.get("install", {}).items()), ""]
    for backend, entry in info.get("backends", {}).items():
        ops = "all ops" if entry.get("ops") == ["all"] else f"{len(entry.get('ops', []))} ops"
        where = entry.get("unavailable") or f"{ops} on {', '.join(entry['devices'])}"
        error = f" (load error: {entry['load_error']})" if "load_error" in entry else ""
        lines.append(f"- {backend}: {where}{error}")
    return lines + [""]


def _md_trainer(result: dict | None) -> list[str]:
    lines = ["## Trainer", ""]
    if not result or "missing" in result:
        return lines + [f"(no run folder: {(result or {}).get('missing', 'not run')})", ""]
    last = result["last"] or {}
    loss = last.get("train/loss")
    return lines + [f"`olmo-fast train` on random tokens, 8 steps saving every 4, then `--resume` to step 10: "
                    f"checkpoints {', '.join(result['checkpoints']) or 'none'}; steps logged "
                    f"{result['steps_logged']}; last loss {'-' if loss is None else f'{loss:.4f}'} at step "
                    f"{last.get('step')}; HF export {'written' if result['hf_export'] else 'missing'}.", ""]


def _md_part(key: str, data, stage: dict) -> list[str]:
    heading = SECTIONS[key][0]
    if data is None or "missing" in data:
        why = (data or {}).get("missing", "not run")
        return [f"## {heading}", "", f"(no results: stage {stage['status']}; {why})", ""]
    if key == "bench":
        return report.md_kernels(data)
    return report.md_records(data.get("title", heading), data)


def page(plan: dict, stages: list[dict], data: dict) -> str:
    env = next((d["env"] for d in (data.get(k) for k in ("bench", "train", "decode")) if d and "env" in d), {})
    info = data.get("info") or {}
    card = env.get("card") or ", ".join(info.get("devices", [])) or "unknown card"
    lines = [f"# olmo-fast GPU check{' (DRY RUN)' if plan.get('dry_run') else ''}: {card}, {plan['started'][:10]}", ""]
    if plan.get("dry_run"):
        lines += ["**Dry run on a CPU**: tiny shapes, Triton's interpreter; it checks the plumbing of every stage. "
                  "No number on this page is a speed.", ""]
    lines += [f"commit `{plan.get('commit')}`, torch {env.get('torch', info.get('torch'))}, triton "
              f"{env.get('triton', info.get('triton'))}, CUDA {env.get('cuda', info.get('torch_cuda'))}; "
              f"total budget {plan['total_s']} s", "", "## Summary", ""]
    found = problems(stages, data)
    lines += ([f"**{len(found)} problem(s):**", ""] + [f"- **{p}**" for p in found] if found
              else ["No problem: every stage passed and everything loaded."])
    lines += ["", "| stage | status | seconds | limit s | note |", "|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['title']} | {s['status']} | {_cell(s.get('seconds'))} | {_cell(s.get('limit_s'))} | "
                     f"{_cell(s.get('note'))} |")
    lines.append("")
    by_key = {s["key"]: s for s in stages}
    lines += ["## Install", ""] + [f"- {by_key[k]['title']}: {_status_line(by_key[k])}"
                                   for k in ("install", "install-fallback") if k in by_key] + [""]
    lines += _md_info(data.get("info"))
    for key in ("bench", "train", "decode"):
        if key in by_key:
            lines += _md_part(key, data.get(key), by_key[key])
    lines += _md_tests("GPU tests", data.get("tests")) + _md_tests("Kernel tests", data.get("kernel_tests"))
    lines += _md_trainer(data.get("trainer"))
    return "\n".join(lines)


def verify(stages: list[dict], data: dict, text: str) -> list[str]:
    """Why the page is incomplete: a planned stage that did not end, or lacks its section or its data."""
    errors = []
    headings = {line[3:].split(" (")[0].split(":")[0].strip() for line in text.splitlines() if line.startswith("## ")}
    for s in stages:
        heading, key = SECTIONS[s["key"]]
        if s["status"] in ("not started", "running"):
            errors.append(f"stage {s['key']} did not end ({s['status']})")
        if heading not in headings:
            errors.append(f"stage {s['key']}: no '## {heading}' section on the page")
        if key is not None and s["status"] != "skipped" and (data.get(key) is None or "missing" in data[key]):
            errors.append(f"stage {s['key']}: no data in the JSON ({(data.get(key) or {}).get('missing', 'absent')})")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", required=True, help="the stage records (JSON lines) of gpu_check.sh")
    parser.add_argument("--md", required=True, help="the page to (re)write")
    parser.add_argument("--json", required=True, help="the raw JSON to (re)write")
    parser.add_argument("--verify", action="store_true", help="exit 1 unless every stage ended with its section")
    parser.add_argument("parts", nargs="*", metavar="PART=PATH", help=f"stage outputs; PART one of {sorted(PARTS)}")
    args = parser.parse_args(argv)
    paths = {}
    for item in args.parts:
        name, _, path = item.partition("=")
        if name not in PARTS or not path:
            parser.error(f"bad part {item!r}: use PART=PATH with PART one of {sorted(PARTS)}")
        paths[name] = Path(path)
    try:
        plan, stages = read_stages(Path(args.stages))
    except (OSError, LookupError) as err:  # no file, no plan line, a plan without its keys
        print(f"check_page: error: {args.stages} is not a gpu_check.sh stage file ({type(err).__name__}: {err})",
              file=sys.stderr)
        return 2
    data = {name.replace("-", "_"): load_part(name, path) for name, path in paths.items()}
    raw = {"schema": 1, "kind": "gpu_check", **{k: plan[k] for k in ("dry_run", "commit", "started", "total_s")},
           "stages": stages, "problems": problems(stages, data), **data}
    text = page(plan, stages, data)
    report.save_json(raw, args.json)
    report.save_text(text + "\n", args.md)
    if args.verify:
        errors = verify(stages, data, text)
        for e in errors:
            print(f"check_page: INCOMPLETE: {e}", file=sys.stderr)
        return 1 if errors else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
