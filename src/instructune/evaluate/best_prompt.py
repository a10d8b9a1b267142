"""The base model's best prompt: every candidate phrasing × shot count scored on the validation split; the best
one, chosen there and never on the test split, is then scored on the test split (`base_best_prompt`)."""

from __future__ import annotations

from dataclasses import replace

from .. import tasktypes
from ..config import EvalConfig
from ..data import Record
from ..errors import InstructuneError
from ..prompts import LIBRARY, PromptFormat, TaskTemplate
from ..prompts.shots import kshot_prompts
from .score import answer, score


def candidates(template: TaskTemplate, wanted: str | list[str], where: str) -> list[tuple[str, TaskTemplate]]:
    """The phrasings to try: every library template of the task type (`all`) or the named ones, each with the
    task's own fields, variables, choices and system prompt; [] for records that bring their own prompts."""
    if template.template is None:
        return []
    names = [n for n in LIBRARY if n.startswith(template.type + "/")] if wanted == "all" else list(wanted)
    unknown = [n for n in names if n not in LIBRARY or not n.startswith(template.type + "/")]
    if unknown:
        raise InstructuneError(f"unknown {template.type} template(s) {unknown}; choose from "
                               f"{[n for n in LIBRARY if n.startswith(template.type + '/')]}", where)
    return [(n, replace(template, template=LIBRARY[n])) for n in names]


def best_prompt(model, fmt: PromptFormat, options: list[tuple[str, TaskTemplate]], records: dict[str, list[Record]],
                shots: list[int], seed: int, room: int, cfg: EvalConfig, task: str) -> dict:
    """Choose (template, shots) by the primary metric on `records["validation"]`; score that choice on
    `records["test"]`. The result carries `choice`: the template, the shots and every validation score."""
    if not records.get("validation"):
        raise InstructuneError("the best-prompt baseline (baseline.templates) needs a validation split", task)
    tried, best = [], None
    for name, template in options:
        variant = PromptFormat(fmt.tok, fmt.chat, template.separator, fmt.seq2seq)
        train = [template.pair(r) for r in records["train"]]
        validation = [template.pair(r) for r in records["validation"]]
        for k in shots:
            prompts = kshot_prompts(variant, validation, train, k, seed, task, room - template.max_new_tokens)
            preds, mode = answer(model, variant, template, prompts, cfg, f"{task}: {name} {k}-shot (validation)")
            value = score(template, validation, preds, prompts, mode)["metrics"][tasktypes.get(template.type).primary_metric]
            tried.append({"template": name, "shots": k, "validation": value})
            if best is None or value > best[0]:
                best = (value, name, k, template, variant, train)
    value, name, k, template, variant, train = best
    test = [template.pair(r) for r in records["test"]]
    prompts = kshot_prompts(variant, test, train, k, seed, task, room - template.max_new_tokens)
    preds, mode = answer(model, variant, template, prompts, cfg, f"{task}: best prompt on test")
    return {**score(template, test, preds, prompts, mode),
            "choice": {"template": name, "shots": k, "validation": value, "tried": tried}}
