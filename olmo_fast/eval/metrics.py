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
    out = {}
    for metric in METRICS:
        scores = choice_scores(requests, loglikelihoods, metric)
        by_doc: dict[int, dict[int, float]] = {}
        labels: dict[int, int] = {}
        for r, score in zip(requests, scores.tolist()):
            by_doc.setdefault(r.doc_id, {}).setdefault(r.cont_id, score)
            labels.setdefault(r.doc_id, r.label)
        correct = []
        for doc, choices in by_doc.items():
            if max(choices) >= len(choices):  # a choice is missing: OLMo skips the document
                continue
            row = torch.full((len(choices),), -float("inf"))
            row[list(choices)] = torch.tensor(list(choices.values()))
            correct.append(float(int(torch.argmax(row)) == labels[doc]))
        out[metric] = sum(correct) / len(correct) if correct else float("nan")
    return out
