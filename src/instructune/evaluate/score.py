"""Answers and scores: a model's answers to prompts (generation or likelihood) and the task's metrics on them."""

from __future__ import annotations

from .. import tasktypes
from ..config import EvalConfig
from ..prompts import Pair, PromptFormat, TaskTemplate
from .generate import generate
from .likelihood import classify_by_likelihood
from .metrics import choice_settled, compute_metrics


def answer(model, fmt: PromptFormat, template: TaskTemplate, prompts: list[str], cfg: EvalConfig,
           desc: str) -> tuple[list[str], str]:
    """The model's answers and how they were produced: greedy generation, or rank classification by likelihood."""
    if tasktypes.get(template.type).choices and cfg.classification_mode == "likelihood" and not fmt.seq2seq:
        return classify_by_likelihood(model, fmt, prompts, template.choices, cfg.batch_size, bf16=cfg.bf16,
                                      desc=desc, answer_tokens=template.max_new_tokens), "likelihood"
    return generate(model, fmt, prompts, template.max_new_tokens, cfg.batch_size, desc=desc, bf16=cfg.bf16,
                    settled=settled(template)), "generation"


def settled(template: TaskTemplate):
    """When a generated answer is final for scoring: a classification answer once it names a choice that no more
    text can change (its metric would be the same, in fewer decoding steps); None: at the end of the answer."""
    if tasktypes.get(template.type).choices and template.choices:
        return lambda text: choice_settled(text, template.choices)
    return None


def score(template: TaskTemplate, test: list[Pair], predictions: list[str], prompts: list[str], mode: str) -> dict:
    """The task's metrics (with their signatures) and every prediction beside its prompt and reference."""
    references = [p.completion for p in test]
    metrics, signatures = compute_metrics(template.type, predictions, references, template.choices)
    return {"metrics": metrics, "signatures": signatures, "mode": mode,
            "predictions": [{"prompt": pr, "reference": r, "prediction": p} for pr, r, p in zip(prompts, references, predictions)]}


def primary(template: TaskTemplate, result: dict) -> str:
    """`metric = value` of the task type's primary metric, for progress messages."""
    metric = tasktypes.get(template.type).primary_metric
    return f"{metric} = {result['metrics'][metric]:.4f}"


def validation_scorer(subsets: list[tuple[TaskTemplate, PromptFormat, list[Pair]]], batch_size: int, bf16: bool):
    """A function of the model: the tasks' own primary metric by greedy generation on fixed validation pairs,
    averaged over tasks (0..1)."""
    subsets = [(t, fmt, pairs) for t, fmt, pairs in subsets if pairs]

    def score_model(model) -> float:
        values = []
        for template, fmt, pairs in subsets:
            prompts = [fmt.pair_prompt(p) for p in pairs]
            preds = generate(model, fmt, prompts, template.max_new_tokens, batch_size,
                             desc=f"{template.task}: validation metric", bf16=bf16, settled=settled(template))
            metrics, _ = compute_metrics(template.type, preds, [p.completion for p in pairs], template.choices)
            values.append(metrics[tasktypes.get(template.type).primary_metric])
        return sum(values) / max(len(values), 1)
    return score_model
