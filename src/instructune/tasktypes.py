"""The task types: per type, the record fields its templates read, how it is scored, its default template and
generation budget, its classical baseline and the data checks that apply to it. `register` adds a type.

An entry names its pieces; each piece lives with its own kind, in a table keyed by name: metric sets in
`evaluate/metrics.py` METRIC_SETS, templates in `prompts/library.py` LIBRARY (named "<type>/<phrasing>"), classical
baselines in `evaluate/classical.py` METHODS, data checks in `data/lint.py` CHECKS. This module imports none of
them: it sits below the config, which checks a task's `type` here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InstructuneError


@dataclass(frozen=True)
class TaskType:
    """One task type; the names in it point into the tables listed at the top of this module."""

    name: str
    inputs: tuple[str, ...]  # record fields a library template reads as the input; the first is the main text
    answer: str  # the record field holding the reference answer (the completion)
    metrics: str  # the metric set that scores it (evaluate/metrics.py METRIC_SETS)
    primary_metric: str  # the metric of that set that ranks variants: best base, best prompt, early stopping
    default_template: str  # the library template for records with raw fields (prompts/library.py LIBRARY)
    max_new_tokens: int | None = None  # generation budget in tokens; None: evaluate.max_new_tokens
    variables: dict[str, Any] = field(default_factory=dict)  # template constants a task's `variables` override
    classical: str | None = None  # the classical baseline (evaluate/classical.py METHODS); None: none
    lint: tuple[str, ...] = ("answer_in_prompt", "empty_input")  # checks run on its pairs (data/lint.py CHECKS)
    choices: bool = False  # the answer is one of a closed set of labels: stratified splits, choices from the
    # training labels when the config gives none, rank classification by likelihood, answers settled early
    integer_answer: bool = False  # an integer answer is taken as its digits (stars 1..5, a year)
    entity_answer: bool = False  # the answer is a list of {text, type} (checked; templates use `format_entities`)


_REGISTRY: dict[str, TaskType] = {}


class UnknownTaskType(InstructuneError, ValueError):
    """A task type nobody registered (a ValueError too, so a config validator reports it with its key)."""


def register(task_type: TaskType) -> TaskType:
    """Add a task type; its name must be new and usable as a template name's prefix."""
    name = task_type.name
    if not name or "/" in name or name != name.strip():
        raise ValueError(f"{name!r} is not a usable task type name (non-empty, no '/', no surrounding spaces)")
    if name in _REGISTRY:
        raise ValueError(f"task type {name!r} is registered already")
    if not task_type.inputs:
        raise ValueError(f"task type {name!r} needs at least one input field")
    _REGISTRY[name] = task_type
    return task_type


def unregister(name: str) -> None:
    """Remove a registered task type (a test's own type, once the test is done)."""
    get(name)
    del _REGISTRY[name]


def get(name: str) -> TaskType:
    if name not in _REGISTRY:
        raise UnknownTaskType(f"unknown task type {name!r}; known task types: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Every registered type, in registration order (the built-in five first)."""
    return tuple(_REGISTRY)


for _builtin in (
    TaskType("classification", inputs=("text",), answer="label", metrics="labels", primary_metric="accuracy",
             default_template="classification/choices", max_new_tokens=8, classical="tfidf_logreg",
             lint=("empty_input",),  # a classification prompt lists the choices by design
             choices=True, integer_answer=True),
    TaskType("summarization", inputs=("text",), answer="summary", metrics="rouge", primary_metric="rougeL",
             default_template="summarization/summarize", max_new_tokens=48, classical="lead"),
    TaskType("translation", inputs=("text",), answer="translation", metrics="sacrebleu", primary_metric="chrf",
             default_template="translation/translate", max_new_tokens=48, classical="copy_source",
             variables={"source_lang": "English", "target_lang": "French"}),
    TaskType("qa", inputs=("context", "question"), answer="answer", metrics="squad", primary_metric="f1",
             default_template="qa/read-answer", max_new_tokens=16, classical="overlap_sentence",
             lint=("qa_answer_not_in_context", "empty_input"),  # an extractive answer is in its context by design
             integer_answer=True),
    TaskType("ner", inputs=("text",), answer="entities", metrics="entities", primary_metric="entity_f1",
             default_template="ner/identify", max_new_tokens=48, classical="entity_dictionary",
             variables={"entity_types": ["person", "organization", "location"]},
             lint=("ner_entity_not_in_text", "answer_in_prompt", "empty_input"), entity_answer=True),
):
    register(_builtin)
BUILTIN = names()  # the five types instructune ships
