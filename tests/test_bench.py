"""The benchmark suite: its work formulas against hand-computed values, its timing statistics, and an end-to-end
CPU run of `olmo-fast bench --shapes cpu-small` whose JSON/CSV are parsed and cross-checked."""
import csv
import importlib.util
import json
import math
import re

import pytest
import torch
from conftest import require_kernel

from olmo_fast.benchmarks import cases, report, roofline, suite, timing
from olmo_fast.cli import main

# Per token of OLMo-7B at bf16 (s = 2): 16384 x 4096 elements = 134,217,728 bytes per tensor.
TENSOR_7B = 16384 * 4096 * 2


def test_memory_bound_bytes_hand_computed():
    assert roofline.layer_norm_bytes(16384, 4096, 2, "fwd") == 2 * TENSOR_7B + 4 * 16384 == 268_500_992
    assert roofline.layer_norm_bytes(16384, 4096, 2, "bwd") == 402_718_720  # dy, y read; dx written; rstd
    assert roofline.layer_norm_bytes(16384, 4096, 2, "fwd+bwd") == 268_500_992 + 402_718_720
    assert roofline.layer_norm_bytes(16384, 4096, 2, "fwd", residual=True) == 536_936_448  # x, res -> y, h
    assert roofline.layer_norm_bytes(16384, 4096, 2, "bwd", residual=True) == 536_936_448  # + dh
    assert roofline.swiglu_bytes(16384, 11008, 2, "fwd") == 1_082_130_432  # [N, 22016] in, [N, 11008] out
    assert roofline.swiglu_bytes(16384, 11008, 2, "bwd") == 1_803_550_720
    assert roofline.rope_bytes(4, 4096, 32, 32, 128, 2, "fwd") == 2**29  # q and k, read + written
    assert roofline.rope_bytes(4, 4096, 32, 32, 128, 2, "fwd+bwd") == 2**30
    assert roofline.qkv_rope_bytes(4, 4096, 32, 32, 128, 2, "fwd") == 805_306_368
    assert roofline.qkv_rope_bytes(4, 4096, 32, 32, 128, 2, "bwd", clip=True) == 1_207_959_552
    assert roofline.decode_attention_bytes(1, 1, 4096, 32, 32, 128, 2) == 67_125_248
    want = 16 * (2 * 4096 * 8 * 128 * 2) + 16 * 2 * 32 * 128 * 2
    assert roofline.decode_attention_bytes(16, 1, 4096, 32, 8, 128, 2) == want
    assert roofline.copy_bytes(2**30) == 2**31


def test_flops_hand_computed():
    # B=4, T=4096, H=32, D=128 causal: 4 * 4 * 4096^2 * 4096 / 2 = 2^39.
    assert roofline.attention_flops(4, 4096, 4096, 32, 128, "fwd") == 2**39
    assert roofline.attention_flops(4, 4096, 4096, 32, 128, "bwd") == 2.5 * 2**39
    assert roofline.attention_flops(4, 4096, 4096, 32, 128, "fwd+bwd") == 3.5 * 2**39
    assert roofline.attention_flops(4, 4096, 4096, 32, 128, "fwd", causal=False) == 2**40
    assert roofline.matmul_flops(8192, 8192, 8192) == 2 * 8192**3
    # 4096 tokens of 4096 against OLMo's 50304 vocab: 2 * 2^24 * 50304 = 1,687,922,147,328 for the logits.
    assert roofline.linear_cross_entropy_flops(4096, 4096, 50304, "fwd") == 1_687_922_147_328
    assert roofline.linear_cross_entropy_flops(4096, 4096, 50304, "fwd+bwd") == 3 * 1_687_922_147_328
    with pytest.raises(ValueError, match="in the forward"):
        roofline.linear_cross_entropy_flops(1, 1, 1, "bwd")


def test_work_dispatch_matches_formulas_and_rejects_nonsense():
    p = {"b": 4, "t": 4096, "hq": 32, "hk": 32, "d": 128, "causal": True, "clip": 8.0}
    assert roofline.work("attention", p, 2, "fwd") == (None, 2**39)
    assert roofline.work("qkv_rope", p, 2, "bwd") == (1_207_959_552, None)
    assert roofline.work("layer_norm", {"n": 16384, "c": 4096, "residual": False}, 2, "fwd") == (268_500_992, None)
    with pytest.raises(ValueError, match="no backward"):
        roofline.work("decode_attention", {"b": 1, "tq": 1, "cached": 8, "hq": 1, "hk": 1, "d": 8}, 2, "bwd")
    with pytest.raises(ValueError, match="mode"):
        roofline.swiglu_bytes(1, 1, 2, "backward")
    with pytest.raises(ValueError, match="no work formula"):
        roofline.work("matmul", {}, 2, "fwd")


def test_quantiles_and_cpu_timer():
    assert timing.quantile([5.0, 1.0, 3.0, 2.0, 4.0], 0.2) == pytest.approx(1.8)  # numpy's linear rule
    assert timing.quantile([7.0], 0.8) == 7.0
    t = timing.summarize([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (t.p20_ms, t.median_ms, t.p80_ms, t.n) == (pytest.approx(1.8), 3.0, pytest.approx(5.2), 5)
    calls = []
    t = timing.time_cpu(lambda i: calls.append(i), n_sets=3, warmup_ms=0.01, rep_ms=0.01, min_rep=4)
    assert t.n >= 4 and 0 <= t.p20_ms <= t.median_ms <= t.p80_ms
    assert set(calls) == {0, 1, 2}  # the input sets are rotated


def test_cpu_timer_interleaves_its_calls_and_keeps_a_failure_to_its_own_place():
    calls = []

    def failing(i):
        calls.append("f")
        if calls.count("f") > 3:
            raise RuntimeError("broke in round 2")

    results = timing.time_cpu_interleaved([lambda i: calls.append("a"), lambda i: calls.append("b"), failing],
                                          warmup_ms=0.01, rep_ms=0.01, min_rep=16, max_rep=16, rounds=4)
    assert isinstance(results[2], RuntimeError)
    assert all(isinstance(t, timing.Timing) and t.n == 16 for t in results[:2])
    # each call's first run and warm-up, then the timed calls round by round (not all of a's, then all of b's)
    assert re.fullmatch("a+b+" + "aaaabbbb" * 4, "".join(c for c in calls if c != "f"))


def test_check_error_catches_another_function():
    x = torch.randn(5, 7)
    assert suite.check_error([x.clone()], [x]) == 0
    assert suite.check_error([x + 0.5 * x.abs().max()], [x]) == pytest.approx(0.5, rel=1e-5)
    assert math.isnan(suite.check_error([torch.full_like(x, float("nan"))], [x]))
    with pytest.raises(ValueError, match="shape"):
        suite.check_error([x.t()], [x])


def test_cases_cover_every_op_and_the_7b_targets():
    labels = {(c.op, c.label) for c in cases.shape_set("olmo-7b")}
    assert ("layer_norm", "16384x4096") in labels and ("swiglu", "16384x22016->11008") in labels
    assert ("rope", "B4 T4096 H32 D128") in labels and ("attention", "B4 T4096 H32 D128 clip8") in labels
    assert {c.params["t"] for c in cases.shape_set("olmo-7b") if c.op == "attention"} == {512, 1024, 2048, 4096, 8192}
    assert {c.params["b"] for c in cases.shape_set("olmo-7b") if c.op == "decode_attention"} == {1, 16}
    for name in cases.SHAPE_SETS:
        assert {c.op for c in cases.shape_set(name)} == set(cases.OPS), name


CPU_PROVIDERS = "eager,ours-cpp,torch-native,sdpa-flash,sdpa-efficient,liger,flash-attn"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--shapes", "cpu-small", "--out", str(out), "--providers", CPU_PROVIDERS,
                 "--rep-ms", "2", "--warmup-ms", "1", "--threads", "1"]) == 0
    return out


def test_cli_cpu_small_end_to_end(cpu_run):
    data = json.loads((cpu_run / "bench.json").read_text())
    rows = data["rows"]
    assert data["state"] == "complete" and not list(cpu_run.glob(".*.tmp"))
    assert data["env"]["torch"] == torch.__version__ and "git_commit" in data["env"]
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    with open(cpu_run / "bench.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert tuple(csv_rows[0]) == report.COLUMNS and len(csv_rows) == len(rows)

    expected = {(c.label, m) for c in cases.shape_set("cpu-small") for m in cases.modes(c.op)}
    eager = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == "eager"}
    assert set(eager) == expected  # every case and mode measured by eager
    for r in rows:
        if r["status"] != "ok":
            assert r["reason"], r  # a provider that did not run says why
            continue
        assert r["check"] == "ok", r  # every measured provider computes the same function as eager
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        seconds = r["median_ms"] * 1e-3
        if r["op"] in ("attention", "linear_cross_entropy"):
            assert r["tflops"] == pytest.approx(r["flops"] / seconds / 1e12)
            assert r["pct_matmul"] == pytest.approx(100 * r["tflops"] / data["ceilings"]["matmul_tflops"])
        else:
            nbytes, _ = roofline.work(r["op"], next(c.params for c in cases.shape_set("cpu-small")
                                                    if c.label == r["shape"]), 4, r["mode"])
            assert r["bytes"] == nbytes and r["gbps"] == pytest.approx(nbytes / seconds / 1e9)
            assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / data["ceilings"]["copy_gbps"])

    by_provider = {}
    for r in rows:
        by_provider.setdefault(r["provider"], set()).add(r["status"])
    assert by_provider["torch-compile"] == {"skipped"}  # deselected, still listed
    assert by_provider["sdpa-efficient"] == {"unavailable"}  # a CUDA kernel, on the CPU
    assert by_provider["sdpa-flash"] == {"ok"}
    for name, module in (("liger", "liger_kernel"), ("flash-attn", "flash_attn")):
        if importlib.util.find_spec(module) is None:
            assert by_provider[name] == {"not installed"}
    assert not [r for r in rows if r["op"] == "decode_attention" and r["mode"] != "fwd"]


def test_cpu_run_scores_every_cpp_op_against_eager_and_attention_against_sdpa(cpu_run, capsys):
    """Every cpp row of the CPU run carries its speed-up over eager measured in the same run (and attention's and
    decoding's over SDPA), and the terminal table lists them; what the ratios are is the bench's to show."""
    data = json.loads((cpu_run / "bench.json").read_text())
    rows = data["rows"]
    cpp = {(r["op"], r["shape"], r["mode"]): r for r in rows if r["provider"] == "ours-cpp"}
    assert {op for op, _, _ in cpp} == set(cases.OPS)  # every op has a cpp kernel on the CPU
    for (op, shape, mode), r in cpp.items():
        assert r["status"] == "ok", r
        same = {x["provider"]: x["median_ms"] for x in rows
                if (x["op"], x["shape"], x["mode"]) == (op, shape, mode) and x["status"] == "ok"}
        assert r["speedup_vs_eager"] == pytest.approx(same["eager"] / r["median_ms"])
        if op in ("attention", "decode_attention"):
            assert r["speedup_vs_sdpa"] == pytest.approx(same["sdpa-flash"] / r["median_ms"])
        else:
            assert r["speedup_vs_sdpa"] is None
    assert all("speedup_vs_eager" not in r for r in rows if r["provider"] in ("eager", "sdpa-flash"))
    with open(cpu_run / "bench.csv") as f:
        csv_cpp = [row for row in csv.DictReader(f) if row["provider"] == "ours-cpp"]
    assert len(csv_cpp) == len(cpp) and all(float(row["speedup_vs_eager"]) > 0 for row in csv_cpp)

    text = report.table(data)
    listed = text[text.index("ours against eager PyTorch and SDPA"):].splitlines()[2:]
    assert len(listed) == len(cpp)
    for line, r in zip(listed, (r for r in rows if r["provider"] == "ours-cpp")):
        fields = line.split()
        assert fields[0] == r["op"] and float(fields[-2]) == pytest.approx(r["speedup_vs_eager"], abs=0.006)
        assert fields[-1] == "-" if r["speedup_vs_sdpa"] is None else \
            float(fields[-1]) == pytest.approx(r["speedup_vs_sdpa"], abs=0.006)


def test_cpu_default_runs_interpreted_triton_on_the_small_cases_only():
    cpu = suite.Suite(torch.device("cpu"), torch.float32, None, None, None, None, log=lambda *a: None)
    small, large = [c for c in cases.shape_set("cpu-small") if c.op == "attention"][::2]
    assert small.size <= suite.INTERPRETED_MAX_SIZE < large.size
    assert cpu.selected("ours-triton", small) is None and cpu.selected("ours-cpp", large) is None
    assert "Triton interpreter" in cpu.selected("ours-triton[tma]", large)
    named = suite.Suite(torch.device("cpu"), torch.float32, {"ours-triton"}, None, None, None, log=lambda *a: None)
    assert named.selected("ours-triton", large) is None  # named in --providers: it runs


def test_compare_and_markdown(cpu_run, tmp_path, capsys):
    a = json.loads((cpu_run / "bench.json").read_text())
    b = json.loads(json.dumps(a))
    for r in b["rows"]:
        if r["status"] == "ok":
            r["median_ms"] *= 2
    b["rows"] = b["rows"][:-3]  # rows missing from one file are left out of the comparison
    (tmp_path / "b.json").write_text(json.dumps(b))
    text, matched = report.compare(a, b)
    assert matched and all(m["ratio"] == pytest.approx(0.5) for m in matched)
    assert len(matched) == sum(r["status"] == "ok" for r in b["rows"])
    assert main(["bench", "--compare", str(cpu_run / "bench.json"), str(tmp_path / "b.json")]) == 0
    assert "0.500" in capsys.readouterr().out

    md = tmp_path / "page.md"
    assert report.main(["--markdown", str(md), str(cpu_run / "bench.json"), str(tmp_path / "absent.json")]) == 0
    page = md.read_text()
    assert "## Kernels" in page and "### attention" in page and "| eager |" in page
    assert "## Missing results" in page and "absent.json" in page

    # The README's Performance lines come from a committed results file: our best beside the best other provider.
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"bench": a, "train": None, "decode": None}))
    capsys.readouterr()
    assert report.main(["--summary", str(raw)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("#### ") and a["env"]["card"] in lines[0]
    ours_rows = {(r["op"], r["shape"], r["mode"]) for r in a["rows"]
                 if r["status"] == "ok" and r["provider"] in report.OURS}
    assert len([ln for ln in lines if ln.startswith("| ") and "| ours-" in ln]) == len(ours_rows)


def test_plots_or_reason(cpu_run, tmp_path):
    data = json.loads((cpu_run / "bench.json").read_text())
    files, note = report.plot(data, tmp_path)
    if importlib.util.find_spec("matplotlib") is None:
        assert files == [] and "matplotlib is not installed" in note
    else:  # cpu-small has one size per op: no sweep to plot, and the note says so
        assert files == [] and "no plot for" in note and "attention" in note
        for r in [r for r in data["rows"] if r["op"] == "swiglu" and r["status"] == "ok"]:
            data["rows"].append({**r, "size": 2 * r["size"], "shape": r["shape"] + " (2x)"})
        files, note = report.plot(data, tmp_path / "sweep")
        assert [f.name for f in files] == ["plot-swiglu.png"] and files[0].stat().st_size > 1000


def test_interpreted_triton_kernel_is_checked_and_timed(tmp_path):
    require_kernel("swiglu_fwd", "triton")
    results = suite.run(["swiglu"], "cpu-small", ["fwd"], "fp32", torch.device("cpu"), providers=["ours-triton"],
                        out_dir=tmp_path, warmup_ms=0, rep_ms=0, plots=False, log=lambda *a: None)
    rows = [r for r in results["rows"] if r["provider"] == "ours-triton"]
    assert len(rows) == len([c for c in cases.shape_set("cpu-small") if c.op == "swiglu"])
    for row in rows:
        assert row["status"] == "ok" and row["check"] == "ok" and row["check_err"] < 1e-5
        # Interpreted on the CPU: the JSON, the CSV and the table say it is a plumbing check, not a speed.
        assert row["note"] == report.INTERPRETED == "Triton interpreter: a plumbing check, not a speed"
    written = [r for r in json.loads((tmp_path / "bench.json").read_text())["rows"] if r["provider"] == "ours-triton"]
    assert len(written) == len(rows) and all(r["note"] == report.INTERPRETED for r in written)
    assert report.INTERPRETED in (tmp_path / "bench.csv").read_text()
    lines = [ln for ln in report.table(results).splitlines() if ln.strip().startswith("ours-triton")]
    assert len(lines) == len(rows) and all(line.endswith(f"[{report.INTERPRETED}]") for line in lines)


def test_train_throughput_bench_runs_every_variant(tmp_path):
    from olmo_fast.benchmarks import train_throughput

    # Every variant: ours on the default backends (the C++ kernels on the CPU) and on torch, and HF.
    out = tmp_path / "train.json"
    variants = list(train_throughput.VARIANTS)
    results = train_throughput.run("test", seq_len=16, batch=2, steps=1, warmup=1, variants=variants,
                                   device=torch.device("cpu"), out=out, log=lambda *a: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))  # rewritten after every variant
    assert results["state"] == "complete"
    assert [r["variant"] for r in results["records"]] == variants
    for rec in results["records"]:
        assert "error" not in rec, rec
        assert rec["tokens_per_s"] == pytest.approx(2 * 16 / (rec["step_ms"] * 1e-3))
        # a random model's first loss is near ln(vocab); all three models compute the same kind of loss
        assert abs(rec["loss"] - math.log(250)) < 1.5
        assert rec["mfu_measured_matmul"] == pytest.approx(
            rec["tokens_per_s"] * rec["flops_per_token"] / results["measured_matmul_flops"])


def test_decode_throughput_bench_beside_hf(tmp_path):
    from olmo_fast.benchmarks import decode_throughput

    out = tmp_path / "decode.json"
    results = decode_throughput.run(["test"], [1, 2], prompt_len=4, new_tokens=3, device=torch.device("cpu"),
                                    dtype=torch.float32, out=out, log=lambda *a: None)
    assert json.loads(out.read_text())["records"] == results["records"] and results["state"] == "complete"
    assert [(r["provider"], r["batch"]) for r in results["records"]] == [
        ("olmo-fast", 1), ("olmo-fast", 2), ("hf-generate", 1), ("hf-generate", 2)]
    for rec in results["records"]:
        assert "error" not in rec, rec
        assert rec["tokens_per_s"] == pytest.approx(rec["batch"] / (rec["ms_per_token"] * 1e-3))
    ours = [r for r in results["records"] if r["provider"] == "olmo-fast"]
    assert all(r["pct_copy_bw"] == pytest.approx(100 * r["achieved_gb_s"] / results["copy_gbps"]) for r in ours)


class _WrongBackward(torch.autograd.Function):
    """SwiGLU's forward with a backward that forgets the gate's gradient: what the check must catch."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        x, gate = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * x

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        x, gate = h.chunk(2, dim=-1)
        return torch.cat((dout * torch.nn.functional.silu(gate), torch.zeros_like(gate)), dim=-1)


def test_check_compares_forward_and_input_gradients(monkeypatch):
    from olmo_fast.benchmarks import providers

    wrong = providers.Provider("wrong-bwd", lambda case, device: providers.Impl(_WrongBackward.apply))
    swapped = providers.Provider("wrong-fwd", lambda case, device: providers.Impl(
        lambda h: torch.nn.functional.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]))  # [gate | x]: another function
    monkeypatch.setattr(suite, "registry", lambda: {"swiglu": [wrong, swapped]})
    results = suite.run(["swiglu"], "cpu-small", list(roofline.MODES), "fp32", torch.device("cpu"),
                        warmup_ms=0, rep_ms=0, log=lambda *a: None)
    check = {(r["provider"], r["mode"]): r["check"] for r in results["rows"]}
    assert check == {("wrong-bwd", "fwd"): "ok", ("wrong-bwd", "bwd"): "MISMATCH",
                     ("wrong-bwd", "fwd+bwd"): "MISMATCH", ("wrong-fwd", "fwd"): "MISMATCH",
                     ("wrong-fwd", "bwd"): "MISMATCH", ("wrong-fwd", "fwd+bwd"): "MISMATCH"}


def test_time_budget_skips_compilers_first_then_everything(monkeypatch):
    # The suite reads the clock once at its start and once before each provider: start at 0; swiglu's two providers
    # at 10 (past 60% of a 15 s budget: the compiler is skipped, eager runs); everything after at 1000 (past it all).
    clock = iter([0.0, 10.0, 10.0] + [1000.0] * 100)
    monkeypatch.setattr(suite.time, "monotonic", lambda: next(clock))
    results = suite.run(["swiglu", "layer_norm"], "cpu-small", ["fwd"], "fp32", torch.device("cpu"),
                        providers=["eager", "torch-compile"], warmup_ms=0, rep_ms=0, budget_s=15, log=lambda *a: None)
    rows = [r for r in results["rows"] if r["provider"] in ("eager", "torch-compile")]
    first_case = sorted(rows[:2], key=lambda r: r["provider"])  # (a skipped row is written before a timed one)
    assert [(r["op"], r["provider"], r["status"]) for r in first_case] == [
        ("swiglu", "eager", "ok"), ("swiglu", "torch-compile", "skipped")]
    assert first_case[1]["reason"] == "time budget (--budget-s): 60% spent, compilers skipped"
    n_cases = len([c for c in cases.shape_set("cpu-small") if c.op in ("swiglu", "layer_norm")])
    assert len(rows) == 2 * n_cases and all(r["status"] == "skipped" and
                                            r["reason"] == "time budget (--budget-s) spent" for r in rows[2:])


def test_cli_rejects_bad_arguments_clearly(capsys, tmp_path):
    assert main(["bench", "--ops", "swiglu,matmul"]) == 2
    assert "unknown ops ['matmul']" in capsys.readouterr().err
    assert main(["bench", "--providers", "eager,cublas"]) == 2
    assert "unknown providers ['cublas']" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert main(["bench", "--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    assert "not a results file" in capsys.readouterr().err
