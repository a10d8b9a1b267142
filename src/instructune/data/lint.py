"""Data warnings for `data lint`: records that are valid but make a run measure less than it seems, each kind with a
count and up to three examples (file:line and a short excerpt)."""

from __future__ import annotations

from typing import Any

EXAMPLES = 3
# A task type's answer field and the field its answers should be found in (see prompts/library.py FIELDS).
_SOURCE = {"ner": ("entities", "text"), "qa": ("answer", "context")}
# The input variables of each task type's library templates (prompts/library.py FIELDS without the answer; data/ may
# not import prompts/).
_INPUTS = {"classification": ("text",), "summarization": ("text",), "translation": ("text",),
           "qa": ("context", "question"), "ner": ("text",)}


def lint_pairs(task_type: str, fields: dict[str, str], pairs: list) -> list[dict[str, Any]]:
    """Warnings about one split's pairs (`Pair`: messages, completion, where, record). `fields` maps template
    variables to record fields, as in the task config. Kinds: ner_entity_not_in_text, qa_answer_not_in_context,
    answer_in_prompt, empty_input, duplicate_keys (the last one from Records, see `lint_records`)."""
    found: dict[str, list[tuple[str, str]]] = {}

    def note(kind: str, where: str, text: str) -> None:
        found.setdefault(kind, []).append((where, text[:80]))

    for pair in pairs:
        record = pair.record or {}
        if task_type in _SOURCE:
            answer_name, source_name = (fields.get(v, v) for v in _SOURCE[task_type])
            source, answer = record.get(source_name), record.get(answer_name)
            if isinstance(source, str):
                if task_type == "ner" and isinstance(answer, list):
                    for e in answer:
                        if isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"] not in source:
                            note("ner_entity_not_in_text", pair.where, e["text"])
                elif task_type == "qa" and isinstance(answer, (str, int)) and not _contains(source, str(answer)):
                    note("qa_answer_not_in_context", pair.where, str(answer))
        prompt = " ".join(m["content"] for m in pair.messages if m["role"] == "user")
        # a classification prompt lists the choices and an extractive answer is in its context by design
        if task_type not in ("classification", "qa") and pair.completion.strip() and pair.completion.strip() in prompt:
            note("answer_in_prompt", pair.where, pair.completion.strip())
        for var, name in _input_fields(task_type, fields):
            value = record.get(name)
            if isinstance(value, str) and not value.strip():
                note("empty_input", pair.where, f"field {name!r} is empty")
    return [_warning(kind, items) for kind, items in found.items()]


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


def _input_fields(task_type: str, fields: dict[str, str]) -> list[tuple[str, str]]:
    return [(v, fields.get(v, v)) for v in _INPUTS.get(task_type, ())]


def format_warnings(task: str, warnings: list[dict[str, Any]]) -> list[str]:
    """Lines for the terminal: one per kind with its count, then its examples indented."""
    lines = []
    for w in warnings:
        lines.append(f"  {task}: {w['count']} {w['message']}")
        lines += [f"    {e['where']}: {e['text']!r}" for e in w["examples"]]
    return lines
