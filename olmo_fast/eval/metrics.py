"""Task metrics from per-choice log-likelihoods, as OLMo's `ICLMetric.compute` gives them.

Per document the choice with the highest score wins (the first on a tie, as `torch.argmax`); the metric is the
fraction of documents whose winner is the label. `acc` scores a choice by its summed log-probability,
`len_norm` by that sum divided by the continuation's characters (without its leading space). Scores are
float32, as OLMo stores them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .requests import Request

METRICS = ("acc", "len_norm")


def choice_scores(requests: Sequence[Request], loglikelihoods: torch.Tensor, metric: str) -> torch.Tensor:
    """float32 [len(requests)]: each choice's score under `metric`."""
    if metric == "acc":
        return loglikelihoods.float()
    if metric == "len_norm":
        return loglikelihoods.float() / torch.tensor([r.chars for r in requests])
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def task_metrics(requests: Sequence[Request], loglikelihoods: torch.Tensor) -> dict[str, float]:
    """{"acc": ..., "len_norm": ...}: the fraction of documents answered right under each scoring."""
    rows: dict[int, dict[int, int]] = {}  # doc -> choice -> its request's index (the first, on a repeat)
    labels: dict[int, int] = {}
    for index, r in enumerate(requests):
        rows.setdefault(r.doc_id, {}).setdefault(r.cont_id, index)
        labels.setdefault(r.doc_id, r.label)
    complete = {doc: choices for doc, choices in rows.items() if max(choices) < len(choices)}  # OLMo skips the rest
    out = {}
    for metric in METRICS:
        scores = choice_scores(requests, loglikelihoods, metric)
        correct = 0
        for doc, choices in complete.items():
            row = torch.full((len(choices),), -float("inf"))
            row[list(choices)] = scores[list(choices.values())]
            correct += int(torch.argmax(row)) == labels[doc]
        out[metric] = correct / len(complete) if complete else float("nan")
    return out
