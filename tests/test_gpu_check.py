"""The GPU check's plumbing, on a CPU: the benches stop on SIGINT/SIGTERM keeping valid JSON of every row measured
(also when a library swallowed the signal's effect), the page builder's sections and its --verify, what `olmo-fast
info` reports as not loaded, and gpu_check.sh --dry-run itself with its slow stages skipped (the full dry run is
CI's `bash benchmarks/gpu_check.sh --dry-run`)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from olmo_fast import environment
from olmo_fast.benchmarks import check_page, providers, report, suite
from olmo_fast.ops import dispatch

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _eager_swiglu(case, device):
    return providers.Impl(providers.op_fn(case, "torch"))


def _signalling(sig: int, swallow: bool):
    """A provider whose call sends `sig` to this process; with `swallow`, it turns the KeyboardInterrupt into an
    ordinary error, as a library does when the signal killed its worker process."""
    def build(case, device):
        def fn(h):
            try:
                os.kill(os.getpid(), sig)
                time.sleep(1)  # the handler runs here
            except KeyboardInterrupt:
                if swallow:
                    raise RuntimeError("compile worker died") from None
                raise
            return h
        return providers.Impl(fn)
    return build


@pytest.mark.parametrize("interleaved", [False, True], ids=["each-at-once", "interleaved"])
@pytest.mark.parametrize("sig,swallow", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["term", "swallowed-int"])
def test_signal_stops_the_suite_and_keeps_the_rows(monkeypatch, tmp_path, sig, swallow, interleaved):
    # Eager's rows (fwd, bwd), then a provider that signals: eager's rows are in bench.json, marked interrupted.
    # Timed each at once (a GPU's order), eager's rows of the case are written before the next provider is even
    # built; interleaved (the CPU's), a case's rows come once all its providers are checked, so the signal comes in
    # the second case (the first case's rows are kept).
    builds = []

    def signalling_build(case, device):
        builds.append(case)
        if interleaved and len(builds) == 1:
            return _eager_swiglu(case, device)
        return _signalling(sig, swallow)(case, device)

    signalling = providers.Provider("signal", signalling_build)
    monkeypatch.setattr(suite, "registry", lambda: {"swiglu": [providers.Provider("eager", _eager_swiglu), signalling]})
    monkeypatch.setattr(suite.Suite, "interleaves", lambda self: interleaved)
    previous = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt):
        suite.run(["swiglu"], "cpu-small", ["fwd", "bwd"], "fp32", CPU, out_dir=tmp_path, warmup_ms=0, rep_ms=0,
                  log=lambda *a: None)
    assert signal.getsignal(sig) is previous  # the handlers are restored
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["state"] == "interrupted" and data["interrupted_by"] == signal.Signals(sig).name
    eager = [r for r in data["rows"] if r["provider"] == "eager"]
    assert [(r["mode"], r["status"]) for r in eager] == [("fwd", "ok"), ("bwd", "ok")]
    assert interleaved == any(r["provider"] == "signal" and r["status"] == "ok" for r in data["rows"])
    assert len((tmp_path / "bench.csv").read_text().splitlines()) == 1 + len(data["rows"])
    assert not list(tmp_path.glob(".*.tmp"))


def _measured(path: Path) -> list[dict]:
    try:
        return [r for r in json.loads(path.read_text())["rows"] if r["status"] == "ok"]
    except (OSError, ValueError):  # not written yet (a half-written file is never seen: it is renamed in)
        return []


def test_bench_cli_sigint_exits_130_with_valid_json(tmp_path):
    """A real SIGINT to `olmo-fast bench` mid-run (on the interpreted Triton kernels, ~1 s a row): exit 130, and
    bench.json valid, holding every row measured, marked interrupted."""
    out = tmp_path / "bench"
    proc = subprocess.Popen([sys.executable, "-m", "olmo_fast.cli", "bench", "--shapes", "cpu-small", "--dtype", "fp32",
                             "--device", "cpu", "--providers", "ours-triton", "--rep-ms", "0", "--warmup-ms", "0",
                             "--out", str(out), "--no-plots"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    deadline = time.monotonic() + 90
    while not _measured(out / "bench.json") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    measured = _measured(out / "bench.json")
    assert measured, "the bench measured no row in time"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "olmo-fast bench: interrupted; the rows measured so far are in" in err and "Traceback" not in err
    data = json.loads((out / "bench.json").read_text())
    assert data["state"] == "interrupted"
    assert [r for r in data["rows"] if r["status"] == "ok"][:len(measured)] == measured
    assert not [r for r in data["rows"] if r["op"] == "decode_attention"]  # the last op: it did stop early


def _wrong_ours(case, device):
    return providers.Impl(lambda h: providers.op_fn(case, "torch")(h) + 1.0)


@pytest.mark.parametrize("name,code", [("ours-triton", 1), ("liger", 0)])
def test_bench_exit_status_on_a_mismatch_of_ours(monkeypatch, capsys, name, code):
    from olmo_fast.cli import main

    monkeypatch.setattr(suite, "registry", lambda: {"swiglu": [providers.Provider("eager", _eager_swiglu),
                                                               providers.Provider(name, _wrong_ours)]})
    assert main(["bench", "--ops", "swiglu", "--modes", "fwd", "--device", "cpu", "--rep-ms", "0", "--warmup-ms", "0",
                 "--no-plots"]) == code
    err = capsys.readouterr().err
    assert (f"FAILED {name} swiglu" in err and "MISMATCH" in err) == (code == 1)


@pytest.mark.parametrize("second,code,state", [("error", 1, "complete"), ("interrupt", 130, "interrupted")])
def test_throughput_bench_exit_status_and_interrupt(monkeypatch, tmp_path, capsys, second, code, state):
    """train_throughput's main: a failed record makes it exit 1; SIGINT/SIGTERM (a KeyboardInterrupt) during the
    second variant exits 130 with the first record written and the file marked interrupted."""
    from olmo_fast.benchmarks import train_throughput

    def measure(variant, *args):
        if variant == "hf-sdpa":
            raise KeyboardInterrupt("SIGTERM") if second == "interrupt" else RuntimeError("out of memory")
        return {"variant": variant, "tokens_per_s": 10.0, "flops_per_token": 1.0, "step_ms": 1.0, "loss": 5.0}

    monkeypatch.setattr(train_throughput, "measure", measure)
    out = tmp_path / "train.json"
    assert train_throughput.main(["--model", "test", "--seq-len", "16", "--device", "cpu", "--out", str(out),
                                  "--variants", "olmo-fast,hf-sdpa"]) == code
    data = json.loads(out.read_text())
    assert data["state"] == state and data["records"][0]["variant"] == "olmo-fast"
    if second == "error":
        assert data["records"][1] == {"variant": "hf-sdpa", "error": "RuntimeError: out of memory"}
    else:
        assert len(data["records"]) == 1 and data["interrupted_by"] == "SIGTERM"
        assert f"interrupted; the records measured so far are in {out}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- what did not load
def _info(**changes) -> dict:
    """An `olmo-fast info` record of a healthy CUDA machine, with `changes`."""
    base = {"torch_cuda": "13.0", "torch_hip": None, "devices": ["NVIDIA H200"], "capability": "9.0",
            "install": {"olmo_fast": str(ROOT / "olmo_fast"), "kernels": str(ROOT / "kernels"),
                        "benchmarks": str(ROOT / "benchmarks"), "distribution": "0.1.0"},
            "extension": {"built": True, "gpu": "cuda", "archs": "9.0"},
            "backends": {"torch": {"ops": ["all"], "devices": ["cpu", "cuda"]},
                         "triton": {"ops": ["attention_fwd"], "devices": ["cuda"]},
                         "cpp": {"ops": ["swiglu_fwd"], "devices": ["cpu", "cuda"]}}}
    return {**base, **changes}


def test_info_problems_name_what_did_not_load():
    assert environment.problems(_info()) == []
    cases = {
        "CPU-only although torch has CUDA": _info(extension={"built": True, "gpu": "none",
                                                            "gpu_error": "cuda build failed: no libcudart_static.a"},
                                                  backends={**_info()["backends"],
                                                            "cpp": {"ops": ["swiglu_fwd"], "devices": ["cpu"]}}),
        "not for this card (9.0)": _info(extension={"built": True, "gpu": "cuda", "archs": "8.0"}),
        "Triton kernels did not load": _info(backends={**_info()["backends"],
                                                       "triton": {"unavailable": "ImportError: boom (at x.py:3)"}}),
        "some Triton kernels did not load": _info(backends={**_info()["backends"], "triton": {
            "ops": ["swiglu_fwd"], "devices": ["cuda"], "load_error": "NameError: x (at attention.py:9)"}}),
        "editable install is missing": _info(install={**_info()["install"], "kernels": None}),
        "not from this checkout": _info(install={**_info()["install"], "benchmarks": "/elsewhere/benchmarks"}),
        "is not built": _info(extension={"built": False, "reason": "not built: OLMO_FAST_NO_EXT is set"}),
        "sees no GPU": _info(devices=["cpu"], capability=None),
    }
    for expected, record in cases.items():
        found = environment.problems(record)
        assert any(expected in line for line in found), (expected, found)
    # 8.0+PTX is JIT-compiled for a 9.0 card: not a problem.
    assert environment.problems(_info(extension={"built": True, "gpu": "cuda", "archs": "8.0+PTX"})) == []


def test_dispatch_records_a_provider_that_fails_part_way(monkeypatch, tmp_path):
    (tmp_path / "half_provider.py").write_text(
        "from olmo_fast.ops.dispatch import register_kernel\n"
        "register_kernel('half_op', 'triton', lambda x: x, ('cuda',))\n"
        "raise ImportError('kernel module two failed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(dispatch, "_PROVIDERS", {"triton": "half_provider"})
    for name in ("_KERNELS", "_UNAVAILABLE"):
        monkeypatch.setattr(dispatch, name, {})
    monkeypatch.setattr(dispatch, "_loaded", set())
    status = dispatch.status()["triton"]
    assert status["ops"] == ["half_op"]
    assert status["load_error"] == "ImportError: kernel module two failed (at half_provider.py:3)"
    with pytest.raises(dispatch.BackendError, match="kernel module two failed"):
        dispatch.kernel("other_op", "triton", "cuda")
    assert dispatch.resolve("other_op", None, torch.device("cpu")) == "torch"  # still falls back
    found = environment.problems(_info(backends={"triton": status, "cpp": _info()["backends"]["cpp"]}))
    assert found == ["some Triton kernels did not load (their ops fall back): " + status["load_error"]]


def test_info_cli_strict_and_save(tmp_path, capsys):
    from olmo_fast.cli import main

    code = main(["info", "--strict", "--save", str(tmp_path / "info.json")])
    saved = json.loads((tmp_path / "info.json").read_text())
    assert code == (1 if saved["problems"] else 0)
    out = capsys.readouterr().out
    assert ("WHAT DID NOT LOAD" in out) == bool(saved["problems"]) and saved["install"]["kernels"]


# ---------------------------------------------------------------------------------------- the results page
def _run_folder(tmp_path: Path, stages: dict[str, str]) -> tuple[Path, list[str]]:
    """A run folder as gpu_check.sh leaves it: stage records and every part (a real bench of one case)."""
    plan = {"plan": [{"key": k, "title": k, "limit_s": 10} for k in check_page.SECTIONS],
            "dry_run": True, "commit": "abc", "started": "2026-11-30T00:00:00Z", "total_s": 480}
    lines = [plan] + [{"key": k, "title": k, "status": s, "seconds": 1, "limit_s": 10, "note": ""}
                      for k, s in stages.items()]
    (tmp_path / "stages.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    suite.run(["swiglu"], "cpu-small", ["fwd"], "fp32", CPU, providers=["eager"], out_dir=tmp_path / "bench",
              warmup_ms=0, rep_ms=0, plots=False, log=lambda *a: None)
    for key, title in (("train", "Training throughput: test"), ("decode", "Generation throughput (greedy)")):
        report.save_json({"kind": key, "title": title, "state": "complete", "records": [{"variant": "x", "a": 1.5}]},
                         tmp_path / f"{key}.json")
    (tmp_path / "info.json").write_text(json.dumps(_info()))
    xml = ('<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1" time="2.5">'
           '<testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a" name="test_s">'
           '<skipped/></testcase><testcase classname="tests.test_a" name="test_bad[bf16]">'
           '<failure message="assert 1 == 2">trace</failure></testcase></testsuite></testsuites>')
    for name in ("tests", "kernel-tests"):
        (tmp_path / f"{name}.xml").write_text(xml)
    run = tmp_path / "trainer"
    (run / "step4").mkdir(parents=True)
    (run / "step10").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 4, "train/loss": 5.5}\n{"step": 10, "train/loss": 5.25}\n')
    parts = [f"{name}={tmp_path / path}" for name, path in (
        ("info", "info.json"), ("bench", "bench/bench.json"), ("train", "train.json"), ("decode", "decode.json"),
        ("tests", "tests.xml"), ("kernel-tests", "kernel-tests.xml"), ("trainer", "trainer"))]
    return tmp_path, parts


def _page(folder: Path, parts: list[str], verify: bool = True) -> tuple[int, str, dict]:
    code = check_page.main(["--stages", str(folder / "stages.jsonl"), "--md", str(folder / "p.md"),
                            "--json", str(folder / "p.json")] + (["--verify"] if verify else []) + parts)
    return code, (folder / "p.md").read_text(), json.loads((folder / "p.json").read_text())


def test_page_has_every_section_and_verify_passes(tmp_path, capsys):
    folder, parts = _run_folder(tmp_path, dict.fromkeys(check_page.SECTIONS, "ok"))
    code, text, raw = _page(folder, parts)
    assert code == 0, capsys.readouterr().err
    for heading in ("Summary", "Install", "What did not load", "Kernels", "Training throughput",
                    "Generation throughput", "GPU tests", "Kernel tests", "Trainer"):
        assert f"\n## {heading}" in text, heading
    assert "1 passed, 1 failed, 0 errors, 1 skipped of 3" in text and "`tests.test_a::test_bad[bf16]`" in text
    assert "checkpoints step4, step10" in text and "last loss 5.2500 at step 10" in text
    assert raw["tests"]["failed"] == [{"test": "tests.test_a::test_bad[bf16]", "kind": "failure",
                                       "message": "assert 1 == 2"}]
    assert raw["bench"]["state"] == "complete" and raw["bench"]["rows"]
    assert raw["problems"] == ["tests: 1 failed, 0 errors of 3", "kernel_tests: 1 failed, 0 errors of 3"]
    # report --summary reads the same raw file (the README's Performance lines)
    assert report.summary(raw).startswith("#### ")


def test_verify_names_what_is_missing(tmp_path, capsys):
    folder, parts = _run_folder(tmp_path, {**dict.fromkeys(check_page.SECTIONS, "ok"), "decode": "running",
                                           "tests": "skipped"})
    parts = [p for p in parts if not p.startswith(("train=", "tests="))]
    code, text, raw = _page(folder, parts)
    err = capsys.readouterr().err
    assert code == 1
    assert "stage decode did not end (running)" in err
    assert "stage train: no data in the JSON" in err
    assert "stage tests" not in err  # skipped on purpose: no data needed
    assert "stage decode: running" in raw["problems"] and "\n## Training throughput" in text  # the section says why
    (folder / "empty.jsonl").write_text("")
    assert check_page.main(["--stages", str(folder / "empty.jsonl"), "--md", "x.md", "--json", "x.json"]) == 2
    assert "is not a gpu_check.sh stage file" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_dry_run_script_with_its_slow_stages_skipped(tmp_path):
    """gpu_check.sh --dry-run end to end but for the slow stages (CI runs them all): install check, info, and the
    page with every section, verified; the exit status says every stage passed."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "GPU_CHECK_SKIP": "bench train decode tests kernel-tests trainer"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (page,) = tmp_path.glob("*-dry-run.md")
    raw = json.loads(page.with_suffix(".json").read_text())
    assert [(s["key"], s["status"]) for s in raw["stages"]] == [
        ("install", "ok"), ("install-fallback", "not needed"), ("info", "ok")] + [
        (k, "skipped") for k in ("bench", "train", "decode", "tests", "kernel-tests", "trainer")]
    assert raw["dry_run"] is True and raw["info"]["problems"] == []
    assert "=== olmo-fast info: ok" in (tmp_path / "gpu_check.log").read_text()
    assert sum(1 for _ in tmp_path.rglob("*") if _.is_file()) <= 8  # the device tool brings back 8 files at most


def test_script_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dryrun"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip() == "usage: bash benchmarks/gpu_check.sh [--dry-run]"
