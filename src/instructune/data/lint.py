"""Data warnings for `data lint`: records that are valid but make a run measure less than it seems, each kind with a
count and up to three examples (file:line and a short excerpt)."""

from __future__ import annotations

from typing import Any

from .. import tasktypes

EXAMPLES = 3


def lint_pairs(task_type: str, fields: dict[str, str], pairs: list) -> list[dict[str, Any]]:
    """Warnings about one split's pairs (`Pair`: messages, completion, where, record). `fields` maps template
    variables to record fields, as in the task config. Kinds: the task type's own checks (`TaskType.lint`, from
    CHECKS: ner_entity_not_in_text, qa_answer_not_in_context, answer_in_prompt, empty_input), and duplicate_keys
    (from Records, see `lint_records`)."""
    ttype = tasktypes.get(task_type)
    checks = [CHECKS[name] for name in ttype.lint]
    found: dict[str, list[tuple[str, str]]] = {}

    def note(kind: str, where: str, text: str) -> None:
        found.setdefault(kind, []).append((where, text[:80]))

    for pair in pairs:
        for check in checks:
            check(ttype, fields, pair, note)
    return [_warning(kind, items) for kind, items in found.items()]


def _answer_and_source(ttype: tasktypes.TaskType, fields: dict[str, str], pair) -> tuple[Any, Any]:
    """The record's answer and its main input (the text the answer should be found in)."""
    record = pair.record or {}
    answer, source = (fields.get(v, v) for v in (ttype.answer, ttype.inputs[0]))
    return record.get(answer), record.get(source)


def entities_not_in_text(ttype, fields, pair, note) -> None:
    answer, source = _answer_and_source(ttype, fields, pair)
    if isinstance(source, str) and isinstance(answer, list):
        for e in answer:
            if isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"] not in source:
                note("ner_entity_not_in_text", pair.where, e["text"])


def answer_not_in_context(ttype, fields, pair, note) -> None:
    answer, source = _answer_and_source(ttype, fields, pair)
    if isinstance(source, str) and isinstance(answer, (str, int)) and not _contains(source, str(answer)):
        note("qa_answer_not_in_context", pair.where, str(answer))


def answer_in_prompt(ttype, fields, pair, note) -> None:
    prompt = " ".join(m["content"] for m in pair.messages if m["role"] == "user")
    if pair.completion.strip() and pair.completion.strip() in prompt:
        note("answer_in_prompt", pair.where, pair.completion.strip())


def empty_input(ttype, fields, pair, note) -> None:
    record = pair.record or {}
    for var in ttype.inputs:
        name = fields.get(var, var)
        value = record.get(name)
        if isinstance(value, str) and not value.strip():
            note("empty_input", pair.where, f"field {name!r} is empty")


# The checks a task type may name in `TaskType.lint`, each noting warnings of the kind it is named after.
CHECKS = {
    "ner_entity_not_in_text": entities_not_in_text,
    "qa_answer_not_in_context": answer_not_in_context,
    "answer_in_prompt": answer_in_prompt,
    "empty_input": empty_input,
}


def lint_records(records: list) -> list[dict[str, Any]]:
    """Warnings found while reading (`Record.meta`): JSON objects that give a key twice (the last value was used)."""
    items = [(r.where, ", ".join(r.meta["duplicate_keys"])) for r in records if r.meta.get("duplicate_keys")]
    return [_warning("duplicate_keys", items)] if items else []


MESSAGES = {
    "ner_entity_not_in_text": "NER entities not found in their text (the model cannot copy them)",
    "qa_answer_not_in_context": "QA answers not found in their context (not extractive)",
    "answer_in_prompt": "answers that appear verbatim in the prompt (the template may leak the answer)",
    "empty_input": "records whose input field is empty (the prompt is template text only)",
    "duplicate_keys": "JSON records giving a key twice (the last value was used)",
}


def _warning(kind: str, items: list[tuple[str, str]]) -> dict[str, Any]:
    return {"kind": kind, "message": MESSAGES[kind], "count": len(items),
            "examples": [{"where": w, "text": t} for w, t in items[:EXAMPLES]]}


def _contains(source: str, answer: str) -> bool:
    return " ".join(answer.split()).casefold() in " ".join(source.split()).casefold()


def format_warnings(task: str, warnings: list[dict[str, Any]]) -> list[str]:
    """Lines for the terminal: one per kind with its count, then its examples indented."""
    lines = []
    for w in warnings:
        lines.append(f"  {task}: {w['count']} {w['message']}")
        lines += [f"    {e['where']}: {e['text']!r}" for e in w["examples"]]
    return lines
