"""The record shapes we recognise (prompt/completion, Alpaca, OpenAI chat messages, raw labeled fields) and the checks
that a record's values are what its shape promises: bad values are errors naming the record, never coerced.

Numbers: an integer is accepted (and rendered as its decimal digits) only where it is obviously meant as an answer:
a classification label (`"label": 3`, stars 1..5) and a QA answer (`"answer": 1998`). Everywhere else, and for
floats and booleans everywhere, a template that renders text needs a string."""

from __future__ import annotations

from typing import Any

from ..errors import InstructuneError

SHAPES = ("prompt_completion", "alpaca", "messages", "raw")
ROLES = ("system", "user", "assistant")


def detect_shape(data: dict[str, Any]) -> str:
    if "messages" in data:  # a `messages` that is no list is a broken chat record, not a raw one
        return "messages"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "instruction" in data and "output" in data:
        return "alpaca"
    return "raw"


def kind(value: Any) -> str:
    """A value's JSON kind, for messages ("null", "a number", "a list", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, dict) else type(value).__name__


def text_value(value: Any, name: str, where: str, integer_ok: bool = False, empty_ok: bool = True) -> str:
    """A field's value as the text a template renders: a string (or, with `integer_ok`, an integer), else an error."""
    if isinstance(value, str):
        if not empty_ok and not value.strip():
            raise InstructuneError(f"empty completion: field {name!r} is empty", where)
        return value
    if integer_ok and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    expected = "a string or an integer" if integer_ok else "a string"
    if value is None:
        raise InstructuneError(f"field {name!r} is null; expected {expected} (fix or drop the record)", where)
    raise InstructuneError(f"field {name!r} is {kind(value)}; expected {expected}", where)


def check_messages(messages: Any, where: str, name: str = "messages", last: str | None = "assistant",
                   roles: tuple[str, ...] = ROLES, need_user: bool = True) -> list[dict[str, str]]:
    """Chat turns as [{role, content}]: a non-empty list of objects, known roles, non-empty string content, at least one
    user turn (unless `need_user` is False) and, when `last` is given, that role last. Other keys are dropped."""
    if not isinstance(messages, list):
        raise InstructuneError(f"{name} is {kind(messages)}; expected a list of {{role, content}} objects", where)
    if not messages:
        raise InstructuneError(f"{name} is an empty list", where)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InstructuneError(f"{name}[{i}] is {kind(m)}; expected an object with `role` and `content`", where)
        role, content = m.get("role"), m.get("content")
        if role not in roles:
            raise InstructuneError(f"{name}[{i}].role is {role!r}; expected one of {', '.join(roles)}", where)
        if not isinstance(content, str):
            raise InstructuneError(f"{name}[{i}].content is {kind(content)}; expected a string", where)
        if not content.strip():
            raise InstructuneError(f"{name}[{i}].content is empty", where)
        out.append({"role": role, "content": content})
    if need_user and not any(m["role"] == "user" for m in out):
        raise InstructuneError(f"{name} has no user turn", where)
    if last is not None and out[-1]["role"] != last:
        what = "the assistant's answer" if last == "assistant" else f"a {last} turn"
        raise InstructuneError(f"{name} must end with {what}; {name}[{len(out) - 1}] is the {out[-1]['role']}'s", where)
    return out


def check_entities(value: Any, name: str, where: str) -> list[dict[str, str]]:
    """NER entities: a list (possibly empty) of {text, type} objects with non-empty string values."""
    if not isinstance(value, list):
        raise InstructuneError(f"field {name!r} is {kind(value)}; expected a list of {{text, type}} objects", where)
    for i, e in enumerate(value):
        if not isinstance(e, dict):
            raise InstructuneError(f"{name}[{i}] is {kind(e)}; expected an object with `text` and `type`", where)
        for key in ("text", "type"):
            if key not in e:
                raise InstructuneError(f"{name}[{i}] has no `{key}`; expected {{text, type}}", where)
            if not isinstance(e[key], str) or not e[key].strip():
                raise InstructuneError(f"{name}[{i}].{key} is {kind(e[key]) if not isinstance(e[key], str) else 'empty'}"
                                       "; expected a non-empty string", where)
    return value
