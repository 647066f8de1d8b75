"""Outputs of the suite: terminal table, CSV, JSON, PNG sweep plots, `--compare` ratios, and the Markdown
results page the GPU check commits (`python -m olmo_fast.benchmarks.report --markdown OUT.md RESULT.json...`).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

# The note on our Triton rows on a CPU (TRITON_INTERPRET=1): the table, the CSV and the JSON carry it.
INTERPRETED = "Triton interpreter: a plumbing check, not a speed"
COLUMNS = ("op", "shape", "size", "variant", "mode", "dtype", "provider", "status", "median_ms", "p20_ms", "p80_ms",
           "n", "bytes", "flops", "gbps", "tflops", "pct_copy_bw", "pct_matmul", "peak_mem_mb", "check", "check_err",
           "speedup_vs_eager", "speedup_vs_sdpa", "reason", "note")
# The baselines our rows are scored against in the same run: eager PyTorch, and (attention, decoding) the fastest
# PyTorch SDPA backend measured (on a CPU, sdpa-flash: the CPU's fused SDPA kernel).
EAGER, SDPA_PREFIX = "eager", "sdpa-"



def _median(row: dict) -> float:
    return row["median_ms"]

def _num(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def rate(row: dict) -> str:
    """'0.123 ms  1234.5 GB/s  82.0% of copy' (or TFLOP/s and % of matmul), or the status and reason."""
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('reason', '')}"
    if row.get("gbps") is not None:
        value = f"{row['gbps']:8.1f} GB/s    " + _num(row.get("pct_copy_bw"), "5.1f") + "% of copy"
    else:
        value = f"{row['tflops']:8.2f} TFLOP/s " + _num(row.get("pct_matmul"), "5.1f") + "% of matmul"
    check = "" if row.get("check") == "ok" else f"  check {row.get('check')} (err {row.get('check_err'):.2e})"
    return f"{row['median_ms']:9.4f} ms {value}{check}"


def table(results: dict) -> str:
    """The terminal table: one block per (op, shape, mode), providers fastest first, the rest after."""
    lines = []
    env, ceil = results["env"], results.get("ceilings", {})
    lines.append(f"{env['card']} | torch {env['torch']} | triton {env.get('triton')} | cuda {env.get('cuda')} | "
                 f"commit {str(env.get('git_commit'))[:12]}")
    if ceil:
        lines.append(f"ceilings: copy {ceil['copy_gbps']:.1f} GB/s, {ceil['matmul_dtype']} matmul "
                     f"{ceil['matmul_tflops']:.2f} TFLOP/s")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in results["rows"]:
        groups[(row["op"], row["shape"], row["mode"], row["dtype"])].append(row)
    for (op, shape, mode, dtype), rows in groups.items():
        lines.append(f"\n{op}  {shape}  {mode}  {dtype}")
        ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["median_ms"])
        best = ok[0]["median_ms"] if ok else None
        for r in ok:
            spread = f"[{r['p20_ms']:.4f}-{r['p80_ms']:.4f}]"
            mem = "" if r.get("peak_mem_mb") is None else f"  {r['peak_mem_mb']:8.1f} MB"
            note = f"  [{INTERPRETED}]" if r.get("note") == INTERPRETED else ""
            lines.append(f"  {r['provider']:<15} {rate(r)} {spread} x{r['median_ms'] / best:5.2f}{mem}{note}")
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"  {r['provider']:<15} {r['status']}: {r.get('reason', '')}")
    speedups = speedup_table(results)
    return "\n".join(lines + (["", speedups] if speedups else []))


def add_speedups(rows: list[dict]) -> None:
    """Sets `speedup_vs_eager` (eager's median / ours) and, where an SDPA backend ran, `speedup_vs_sdpa` (the
    fastest SDPA's median / ours) on each measured row of ours (`is_ours`) among `rows`: > 1, ours is faster.
    Only rows of one run are compared, per (op, shape, mode, dtype)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            groups[(row["op"], row["shape"], row["mode"], row["dtype"])].append(row)
    for group in groups.values():
        eager = next((r["median_ms"] for r in group if r["provider"] == EAGER), None)
        sdpa = min((r["median_ms"] for r in group if r["provider"].startswith(SDPA_PREFIX)), default=None)
        for row in group:
            if is_ours(row["provider"]):
                row["speedup_vs_eager"] = None if eager is None else eager / row["median_ms"]
                row["speedup_vs_sdpa"] = None if sdpa is None else sdpa / row["median_ms"]


def speedup_table(results: dict) -> str:
    """Our measured rows against eager and SDPA, times from the same run (`add_speedups`), one line each (not the
    interpreted Triton rows: a plumbing check, not a speed)."""
    measured = [r for r in results["rows"] if r["status"] == "ok" and is_ours(r["provider"])]
    ours = [r for r in measured if INTERPRETED not in (r.get("note") or "")]
    if not ours:
        return ""
    interpreted = len(measured) - len(ours)
    lines = ["ours against eager PyTorch and SDPA, measured in this run (x > 1: ours is faster)" +
             (f"; {interpreted} interpreted Triton rows left out" if interpreted else ""),
             f"  {'op':<20} {'shape':<28} {'mode':<8} {'provider':<15} {'ours ms':>9} {'x eager':>8} {'x sdpa':>8}"]
    for r in ours:
        ratios = [_num(r.get(k), "8.2f") or f"{'-':>8}" for k in ("speedup_vs_eager", "speedup_vs_sdpa")]
        lines.append(f"  {r['op']:<20} {r['shape']:<28} {r['mode']:<8} {r['provider']:<15} {r['median_ms']:9.4f} "
                     f"{ratios[0]} {ratios[1]}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path) -> None:
    """The rows as CSV, through a temporary file (see `save_text`)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") if row.get(k) is not None else "" for k in COLUMNS})
    save_text(text.getvalue(), path)


def plot(results: dict, out_dir: str | Path) -> tuple[list[Path], str]:
    """One PNG per op with a sweep (several sizes): rate against size, a panel per mode, a line per provider.
    Returns the files written and a note on what was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed"
    by_op: dict[str, list[dict]] = defaultdict(list)
    for row in results["rows"]:
        if row["status"] == "ok":
            by_op[row["op"]].append(row)
    written, single = [], []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for op, rows in by_op.items():
        if len({r["size"] for r in rows}) < 2:
            single.append(op)
            continue
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            lines: dict[str, list] = defaultdict(list)
            for r in rows:
                if r["mode"] == mode:
                    rate = r["gbps"] if r.get("gbps") is not None else r["tflops"]
                    lines[" ".join(filter(None, (r["provider"], r.get("variant"))))].append((r["size"], rate))
            for provider, points in sorted(lines.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
            flop_op = rows[0].get("tflops") is not None
            ax.set(xscale="log", title=f"{op} {mode}", xlabel="T" if op == "attention" else "cache length" if
                   op == "decode_attention" else "tokens", ylabel="TFLOP/s" if flop_op else "GB/s")
            ceiling = results.get("ceilings", {}).get("matmul_tflops" if flop_op else "copy_gbps")
            if ceiling:
                ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1, label="measured ceiling")
            ax.legend(fontsize=7)
        fig.suptitle(f"{op} ({rows[0]['dtype']}) on {results['env']['card']}")
        fig.tight_layout()
        path = Path(out_dir) / f"plot-{op}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    note = f"no plot for {', '.join(single)}: a single size (use --shapes sweep)" if single else ""
    return written, note


def save_text(text: str, path: str | Path) -> None:
    """Write `text` to `path` (its folder created) through a temporary file renamed over it: a reader, or a
    run killed while writing, never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    tmp.replace(path)


def save_json(data: dict, path: str | Path) -> None:
    """`data` as JSON at `path`, atomically (`save_text`)."""
    save_text(json.dumps(data, indent=1), path)


def write(results: dict, out_dir: str | Path, plots: bool = True, log=print) -> None:
    """bench.json, bench.csv and (with `plots`) plot-<op>.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_json(results, out / "bench.json")
    write_csv(results["rows"], out / "bench.csv")
    if plots:
        try:
            files, note = plot(results, out)
        except Exception as err:  # noqa: BLE001 - a plotting problem must not lose the measurements
            files, note = [], f"plots failed: {type(err).__name__}: {err}"
        log(f"wrote {out / 'bench.json'}, {out / 'bench.csv'}" + "".join(f", {f}" for f in files))
        if note:
            log(note)


def load(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if "rows" not in data or "env" not in data:
        raise ValueError(f"{path} is not a results file of `olmo-fast bench` (no rows/env)")
    return data


def compare(a: dict, b: dict) -> tuple[str, list[dict]]:
    """Per row present in both (same op, shape, mode, dtype, provider, both measured): time A / time B (> 1: B is
    faster). Returns the printed text and the matched rows."""
    key = lambda r: (r["op"], r["shape"], r["mode"], r["dtype"], r["provider"])  # noqa: E731
    rows_b = {key(r): r for r in b["rows"] if r["status"] == "ok"}
    matched = []
    for r in a["rows"]:
        other = rows_b.get(key(r))
        if r["status"] == "ok" and other is not None:
            matched.append({"op": r["op"], "shape": r["shape"], "mode": r["mode"], "dtype": r["dtype"],
                            "provider": r["provider"], "a_ms": r["median_ms"], "b_ms": other["median_ms"],
                            "ratio": r["median_ms"] / other["median_ms"]})
    lines = [f"A: {a['env']['card']} {str(a['env'].get('git_commit'))[:12]} {a['env']['date']}",
             f"B: {b['env']['card']} {str(b['env'].get('git_commit'))[:12]} {b['env']['date']}",
             f"{'op':<16} {'shape':<30} {'mode':<8} {'provider':<15} {'A ms':>10} {'B ms':>10} {'A/B':>7}"]
    for m in matched:
        lines.append(f"{m['op']:<16} {m['shape']:<30} {m['mode']:<8} {m['provider']:<15} {m['a_ms']:10.4f} "
                     f"{m['b_ms']:10.4f} {m['ratio']:7.3f}")
    if not matched:
        lines.append("(no row measured in both files)")
    return "\n".join(lines), matched


# ---------------------------------------------------------------- the Markdown page of a GPU check
def md_kernels(results: dict) -> list[str]:
    ceil = results["ceilings"]
    lines = [f"## Kernels ({results['settings']['dtype']}, shapes `{results['settings']['shapes']}`)", ""]
    state = results.get("state", "complete")
    if state != "complete":
        by = f", {results['interrupted_by']}" if "interrupted_by" in results else ""
        lines += [f"**Cut short** (state: {state}{by}): the {len(results['rows'])} rows measured are below.", ""]
    if ceil:
        timer = ("CUDA-event timings with the L2 flushed before each call" if results["env"].get("device") == "cuda"
                 else "perf_counter timings")
        lines += [f"Ceilings measured in this run: device-to-device copy **{ceil['copy_gbps']:.0f} GB/s**, "
                  f"{ceil['matmul_dtype']} matmul {'x'.join(map(str, ceil['matmul_shape']))} "
                  f"**{ceil['matmul_tflops']:.1f} TFLOP/s**. Times are medians of {timer} (p20-p80 in brackets); "
                  f"rates count the least bytes/FLOPs each op must move (`benchmarks/roofline.py`).", ""]
    else:
        lines += ["(the ceilings were not measured: the run was cut short before)", ""]
    by_op: dict[str, list[dict]] = defaultdict(list)
    for row in results["rows"]:
        by_op[row["op"]].append(row)
    for op, rows in by_op.items():
        lines += [f"### {op}", "", "| shape | mode | provider | median ms [p20-p80] | rate | % of ceiling | "
                  "peak MB | check |", "|---|---|---|---|---|---|---|---|"]
        ok = [r for r in rows if r["status"] == "ok"]
        ok.sort(key=lambda r: (r["size"], r["shape"], r["mode"], r["median_ms"]))
        for r in ok:
            flop = r.get("tflops") is not None
            value = f"{r['tflops']:.1f} TFLOP/s" if flop else f"{r['gbps']:.0f} GB/s"
            pct = r.get("pct_matmul") if flop else r.get("pct_copy_bw")
            lines.append(f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['median_ms']:.4f} "
                         f"[{r['p20_ms']:.4f}-{r['p80_ms']:.4f}] | {value} | {_num(pct, '.1f')}% | "
                         f"{_num(r.get('peak_mem_mb'), '.0f')} | {r.get('check')} |")
        absent = {}
        for r in rows:
            if r["status"] != "ok":
                absent.setdefault(f"{r['provider']}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else ""),
                                  None)
        if absent:
            lines += ["", "Not measured: " + "; ".join(absent)]
        notes = {r["provider"]: r["note"] for r in ok if r.get("note")}
        if notes:
            lines += ["", "Notes: " + "; ".join(f"{k}: {v}" for k, v in notes.items())]
        lines.append("")
    return lines


def md_records(title: str, data: dict) -> list[str]:
    """A throughput result (train/decode): `records` is a list of flat dicts, shown as a table."""
    records = data.get("records", [])
    lines = [f"## {title}", ""]
    if data.get("state", "complete") != "complete":
        lines += [f"**Cut short** (state: {data['state']}): the {len(records)} records measured are below.", ""]
    if data.get("note"):
        lines += [data["note"], ""]
    if not records:
        return lines + ["(no records)", ""]
    keys = list(dict.fromkeys(k for rec in records for k in rec))
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for rec in records:
        cells = [_num(rec.get(k), ".4g") if isinstance(rec.get(k), float) else
                 "" if rec.get(k) is None else str(rec[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(results: list[dict]) -> str:
    env = next(r["env"] for r in results if "env" in r)
    lines = [f"# olmo-fast GPU check: {env['card']}, {env['date'][:10]}", "",
             f"torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"commit `{env.get('git_commit')}`" + (" (with uncommitted changes)" if env.get("git_dirty") else ""), ""]
    for data in results:
        kind = data.get("kind", "microbench")
        if kind == "microbench":
            lines += md_kernels(data)
        else:
            lines += md_records(data.get("title", kind), data)
    return "\n".join(lines)


OURS = ("ours-triton", "ours-cpp")


def is_ours(provider: str) -> bool:
    """One of `OURS`, or an attention variant of one (`ours-triton[<variant>]`)."""
    return provider.split("[")[0] in OURS


def failed_rows(rows: list[dict]) -> list[dict]:
    """Rows of ours (`is_ours`) that computed another function than eager (check MISMATCH) or raised."""
    return [r for r in rows if is_ours(r["provider"]) and
            (r["status"] == "error" or str(r.get("check", "")).startswith("MISMATCH"))]


def failure_text(row: dict) -> str:
    """What went wrong in a row of `failed_rows`: its MISMATCH check, or its status and reason."""
    return row["check"] if row["status"] == "ok" else f"{row['status']}: {row['reason']}"


def summary(raw: dict) -> str:
    """The README's Performance lines for one committed GPU check (`benchmarks/results/<date>-<card>.json`, which
    holds the bench/train/decode results): per op, shape and mode, our best provider beside the best other one."""
    parts = [raw.get(k) for k in ("bench", "train", "decode")]
    env = next((p["env"] for p in parts if p), None)
    if env is None:
        return "(no results in this file)"
    lines = [f"#### {env['card']} ({env['date'][:10]}, commit `{str(env.get('git_commit'))[:12]}`, torch "
             f"{env['torch']}, triton {env.get('triton')})", ""]
    bench = raw.get("bench")
    if bench:
        ceil = bench["ceilings"]
        measured = (f"Measured ceilings: copy {ceil['copy_gbps']:.0f} GB/s, {ceil['matmul_dtype']} matmul "
                    f"{ceil['matmul_tflops']:.0f} TFLOP/s. " if ceil else "")
        lines += [f"{measured}{bench['settings']['dtype']}, medians.", "",
                  "| op | shape | mode | ours | ours ms | rate (% of ceiling) | best other | other ms | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in bench["rows"]:
            if r["status"] == "ok" and r.get("check") == "ok":
                groups[(r["op"], r["shape"], r["mode"])].append(r)
        for (op, shape, mode), rows in groups.items():
            ours = min((r for r in rows if is_ours(r["provider"])), key=_median, default=None)
            other = min((r for r in rows if not is_ours(r["provider"])), key=_median, default=None)
            if ours is None:
                continue
            flop = ours.get("tflops") is not None
            value = (f"{ours['tflops']:.0f} TFLOP/s ({_num(ours.get('pct_matmul'), '.0f')}%)" if flop else
                     f"{ours['gbps']:.0f} GB/s ({_num(ours.get('pct_copy_bw'), '.0f')}%)")
            alt = ("-", "-", "-") if other is None else (other["provider"], f"{other['median_ms']:.4f}",
                                                         f"{other['median_ms'] / ours['median_ms']:.2f}x")
            lines.append(f"| {op} | {shape} | {mode} | {ours['provider']} | {ours['median_ms']:.4f} | {value} | "
                         f"{alt[0]} | {alt[1]} | {alt[2]} |")
        lines.append("")
    for key, cols in (("train", ("variant", "tokens_per_s", "mfu_spec", "mfu_measured_matmul", "error")),
                      ("decode", ("model", "provider", "batch", "tokens_per_s", "pct_copy_bw", "error"))):
        data = raw.get(key)
        if data and data.get("records"):
            lines += [f"{data['title']}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for rec in data["records"]:
                lines.append("| " + " | ".join(_num(rec.get(c), ".3g") if isinstance(rec.get(c), float) else
                                               str(rec.get(c) or "") for c in cols) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The GPU check's Markdown page from its result JSON files "
                                                 "(bench, train, decode), or the README's Performance summary of "
                                                 "committed results.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", help="write the page to this .md path")
    what.add_argument("--summary", action="store_true",
                      help="print the Performance lines of committed benchmarks/results/<date>-<card>.json files")
    parser.add_argument("results", nargs="+", help="result JSON files; missing ones are listed as missing")
    args = parser.parse_args(argv)
    loaded, missing = [], []
    for path in args.results:
        try:
            loaded.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            missing.append(f"{path}: {err}")
    if args.summary:
        print("\n".join(summary(raw) for raw in loaded))
        for m in missing:
            print(f"(unreadable: {m})")
        return 0 if loaded else 1
    text = markdown(loaded) if loaded else "# olmo-fast GPU check\n\nNo result file could be read.\n"
    if missing:
        text += "\n## Missing results\n\n" + "\n".join(f"- {m}" for m in missing) + "\n"
    Path(args.markdown).write_text(text)
    print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
