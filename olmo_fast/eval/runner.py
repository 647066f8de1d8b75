"""`evaluate`: score a model on downstream tasks; `DownstreamEvaluator` / `downstream_metrics`: the same, as flat
numbers for a trainer's log (an evaluator tokenizes its tasks once, then scores them at every eval)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..tokenizer import load_tokenizer
from .metrics import task_metrics
from .requests import Request, tokenize_choices
from .scoring import naive_loglikelihoods, shared_loglikelihoods
from .tasks import Task, expand_task_names, get_task


@dataclass
class TaskResult:
    task: str
    metric: str  # the primary metric's name
    score: float  # the primary metric
    acc: float
    len_norm: float
    docs: int
    requests: int
    tokens: int  # tokens of the requests as OLMo feeds them (context + continuation[:-1] each)
    seconds: float
    naive_seconds: float | None = None  # with compare_naive: OLMo's scheme on the same requests
    max_rel_diff: float | None = None  # with compare_naive: largest |shared - naive| / |naive| log-likelihood
    loglikelihoods: list[float] = field(default_factory=list, repr=False)  # per choice, summed log-probability
    choices: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (doc_id, choice) of each

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def as_dict(self, with_loglikelihoods: bool = False) -> dict:
        out = asdict(self)
        out["tokens_per_s"] = self.tokens_per_s
        if not with_loglikelihoods:
            del out["loglikelihoods"], out["choices"]
        return out


def resolve_tasks(names: list[str]) -> list[Task]:
    """Tasks by name (TaskError on an unknown one), before any model work."""
    return [get_task(n) for n in expand_task_names(names)]


def _score(model: torch.nn.Module, requests: list[Request], batch_tokens: int, shared: bool,
           progress: Callable[[int], None] | None) -> tuple[torch.Tensor, float]:
    score = shared_loglikelihoods if shared else naive_loglikelihoods
    start = time.perf_counter()
    lls = score(model, requests, batch_tokens=batch_tokens, progress=progress)
    return lls, time.perf_counter() - start


def task_requests(task: Task, tokenizer, *, limit: int | None, max_length: int, vocab_size: int) -> list[Request]:
    """`task`'s first `limit` documents tokenized into requests of at most `max_length` tokens; ValueError where a
    token id falls outside the model's `vocab_size` rows (the wrong tokenizer)."""
    requests = tokenize_choices(task.choices(limit), tokenizer, max_length)
    top = max((max(r.context + r.continuation) for r in requests), default=0)
    if top >= vocab_size:
        raise ValueError(f"{task.name}: the tokenizer gives token id {top}, outside the model's vocabulary "
                         f"({vocab_size}): pass the tokenizer the model was trained with")
    return requests


def evaluate_task(model: torch.nn.Module, task: Task, tokenizer, *, limit: int | None = None,
                  batch_tokens: int = 2048, shared: bool = True, compare_naive: bool = False,
                  max_length: int | None = None, progress: bool = False,
                  requests: list[Request] | None = None) -> TaskResult:
    """One task's result; `requests`: the task's requests tokenized already (`task_requests`), else built here."""
    if requests is None:
        context = max_length or model.config.max_sequence_length
        requests = task_requests(task, tokenizer, limit=limit, max_length=context,
                                 vocab_size=model.config.embedding_size)
    bar = _progress_bar(task.name, len(requests)) if progress else None
    try:
        lls, seconds = _score(model, requests, batch_tokens, shared, bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    metrics = task_metrics(requests, lls)
    result = TaskResult(task.name, task.metric, metrics[task.metric], metrics["acc"], metrics["len_norm"],
                        docs=len({r.doc_id for r in requests}), requests=len(requests),
                        tokens=sum(len(r.context) + len(r.continuation) - 1 for r in requests), seconds=seconds,
                        loglikelihoods=lls.tolist(), choices=[(r.doc_id, r.cont_id) for r in requests])
    if compare_naive:
        naive, result.naive_seconds = _score(model, requests, batch_tokens, False, None)
        result.max_rel_diff = float(((naive - lls).abs() / naive.abs()).max()) if len(requests) else 0.0
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, tasks: list[str], *, tokenizer=None, limit: int | None = None,
             batch_tokens: int = 2048, shared: bool = True, compare_naive: bool = False,
             max_length: int | None = None, progress: bool = False,
             on_result: Callable[[TaskResult], None] | None = None) -> dict[str, TaskResult]:
    """Score `model` on OLMo's downstream `tasks` (names as in OLMo's label_to_task_map; `mmlu` = its four
    5-shot categories). `model`: an `olmo_fast.OLMo` (the shared path uses its `hidden_states(ids, cache=)`
    and `head_weight`; `shared=False` only `model(input_ids)` -> logits and `.config`).
    `limit`: the first N documents per task. `tokenizer`: a `tokenizers.Tokenizer` (default OLMo's
    dolma-v1_5). `shared=False` scores as OLMo does, one sequence per choice; `compare_naive` also times that
    scheme and records the largest difference. `max_length`: cut requests from the left to this many tokens
    (default: the model's context, as OLMo's `model_ctx_len`). `on_result` is called after each task (e.g. to
    write results as they come)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if max_length is not None and not 1 < max_length <= model.config.max_sequence_length:
        raise ValueError(f"max_length must lie in [2, {model.config.max_sequence_length}], got {max_length}")
    resolved = resolve_tasks(tasks)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    was_training = model.training
    model.eval()
    results: dict[str, TaskResult] = {}
    try:
        for task in resolved:
            results[task.name] = evaluate_task(model, task, tokenizer, limit=limit, batch_tokens=batch_tokens,
                                               shared=shared, compare_naive=compare_naive, max_length=max_length,
                                               progress=progress)
            if on_result:
                on_result(results[task.name])
    finally:
        model.train(was_training)
    return results


def _progress_bar(name: str, total: int):
    from tqdm import tqdm

    return tqdm(desc=name, total=total, unit="choice", leave=False, dynamic_ncols=True)


class DownstreamEvaluator:
    """An in-loop downstream evaluator: its tasks (one label; `mmlu` gives its four categories) tokenized once, at
    construction (a ValueError or TaskError then, before any training), and scored at each call.

    `evaluator(model)` -> {"eval/downstream/<label>_<metric>": value}, keyed as OLMo's in-loop evaluators log
    them, `metric` the task's primary one. Every process of a sharded (FSDP) model must call it, with
    `shared=False` (the shared path calls `model.hidden_states`, which skips the root module's hooks)."""

    def __init__(self, label: str, tokenizer, *, max_length: int, vocab_size: int, limit: int | None = None,
                 batch_tokens: int = 2048) -> None:
        self.batch_tokens = batch_tokens
        self.tasks = [(name, get_task(name)) for name in expand_task_names([label])]
        self.requests = {name: task_requests(task, tokenizer, limit=limit, max_length=max_length,
                                             vocab_size=vocab_size) for name, task in self.tasks}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, shared: bool = True) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            results = {name: evaluate_task(model, task, None, batch_tokens=self.batch_tokens, shared=shared,
                                           requests=self.requests[name]) for name, task in self.tasks}
        finally:
            model.train(was_training)
        return {f"eval/downstream/{name}_{r.metric}": r.score for name, r in results.items()}


def downstream_metrics(model: torch.nn.Module, task_names: list[str], tokenizer=None, limit: int | None = None,
                       batch_tokens: int = 2048, shared: bool = True) -> dict[str, float]:
    """`DownstreamEvaluator`'s numbers for `task_names` in one call (tokenizer: OLMo's dolma-v1_5 by default)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    out: dict[str, float] = {}
    for label in task_names:
        evaluator = DownstreamEvaluator(label, tokenizer, max_length=model.config.max_sequence_length,
                                        vocab_size=model.config.embedding_size, limit=limit, batch_tokens=batch_tokens)
        out.update(evaluator(model, shared=shared))
    return out


def results_table(results: dict[str, TaskResult]) -> str:
    """A model-card-like table: task, metric, score (%), documents, tokens/s; MMLU's category average."""
    rows = [(r.task, r.metric, f"{100 * r.score:.1f}", str(r.docs), f"{r.tokens_per_s:,.0f}",
             f"{r.naive_seconds / max(r.seconds, 1e-9):.1f}x" if r.naive_seconds is not None else "")
            for r in results.values()]
    mmlu = [r.score for r in results.values() if r.task.startswith("mmlu_")]
    if len(mmlu) > 1:
        rows.append(("mmlu (category mean)", "len_norm", f"{100 * sum(mmlu) / len(mmlu):.1f}", "", "", ""))
    header = ("task", "metric", "score", "docs", "tokens/s", "vs naive")
    if all(not row[-1] for row in rows):
        header, rows = header[:-1], [row[:-1] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])
