"""OpenAI's chat fine-tuning format taken as it is: a `messages` record checked as OpenAI checks it, with per-turn
`weight`, `tools` and assistant `tool_calls` / `tool` results.

The checks are those of OpenAI's cookbook "Data preparation and analysis for chat model fine-tuning" (each error
names OpenAI's own code: missing_messages_list, message_missing_key, message_unrecognized_key, unrecognized_role,
missing_content, example_missing_assistant_message), the tool-calling fields of OpenAI's fine-tuning guide, and
`weight` (0 or 1, assistant turns only; absent: 1, so every assistant turn is trained, as at OpenAI). The token
limit is checked where the tokens are known (`prompts/conversation.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import InstructuneError
from .shapes import kind

ROLES = ("system", "user", "assistant", "tool")
KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call"}


@dataclass
class Conversation:
    """A checked chat record: its turns as a chat template takes them (no `weight`; tool-call arguments as objects),
    the weight of each turn (None where not an assistant's) and the record's `tools` (None: none given)."""

    messages: list[dict[str, Any]]
    weights: list[int | None]
    tools: list[dict[str, Any]] | None = None


def check_conversation(record: dict[str, Any], where: str) -> Conversation:
    """The record's `messages` (and `tools`) checked; the first problem is an error naming the record."""
    if record.get("messages") is None:
        raise InstructuneError("no `messages` list (OpenAI: missing_messages_list)", where)
    messages = record["messages"]
    if not isinstance(messages, list):
        raise InstructuneError(f"messages is {kind(messages)}; expected a list of {{role, content}} objects", where)
    if not messages:
        raise InstructuneError("messages is an empty list (OpenAI: missing_messages_list)", where)
    tools = check_tools(record.get("tools"), where)
    turns, weights = [], []
    for i, m in enumerate(messages):
        turn, weight = _message(m, f"messages[{i}]", where)
        turns.append(turn)
        weights.append(weight)
    if "assistant" not in [t["role"] for t in turns]:
        raise InstructuneError("messages has no assistant turn; it must end with the assistant's answer "
                               "(OpenAI: example_missing_assistant_message)", where)
    if not any(t["role"] == "user" for t in turns):
        raise InstructuneError("messages has no user turn", where)
    if turns[-1]["role"] != "assistant":
        raise InstructuneError(f"messages must end with the assistant's answer; messages[{len(turns) - 1}] is the "
                               f"{turns[-1]['role']}'s", where)
    if not any(weights):
        raise InstructuneError("every assistant turn has weight 0: nothing would be trained", where)
    _check_tool_results(turns, where)
    return Conversation(turns, weights, tools)


def _message(m: Any, name: str, where: str) -> tuple[dict[str, Any], int | None]:
    if not isinstance(m, dict):
        raise InstructuneError(f"{name} is {kind(m)}; expected an object with `role` and `content`", where)
    unknown = sorted(set(m) - KEYS)
    if unknown:
        raise InstructuneError(f"{name} has unrecognized key(s) {', '.join(map(repr, unknown))}; a message takes "
                               f"{', '.join(sorted(KEYS))} (OpenAI: message_unrecognized_key)", where)
    role = m.get("role")
    if role not in ROLES:
        hint = " (OpenAI: message_missing_key)" if role is None else " (OpenAI: unrecognized_role)"
        raise InstructuneError(f"{name}.role is {role!r}; expected one of {', '.join(ROLES)}{hint}", where)
    if "function_call" in m:
        raise InstructuneError(f"{name}.function_call is OpenAI's deprecated function calling; give the call as "
                               "`tool_calls` and the result as a `tool` message", where)
    turn: dict[str, Any] = {"role": role}
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise InstructuneError(f"{name}.tool_calls is on a {role} message; only the assistant calls tools", where)
        turn["tool_calls"] = _tool_calls(calls, f"{name}.tool_calls", where)
    content = m.get("content")
    if content not in (None, "") or not calls:  # a turn that calls tools may have no text
        if "content" not in m:
            raise InstructuneError(f"{name} has no `content` (OpenAI: message_missing_key)", where)
        if not isinstance(content, str):
            raise InstructuneError(f"{name}.content is {kind(content)}; expected a string (OpenAI: missing_content)", where)
        if not content.strip():
            raise InstructuneError(f"{name}.content is empty (OpenAI: missing_content)", where)
        turn["content"] = content
    for key in ("name", "tool_call_id"):
        if key in m:
            if not isinstance(m[key], str) or not m[key].strip():
                raise InstructuneError(f"{name}.{key} is {kind(m[key])}; expected a non-empty string", where)
            turn[key] = m[key]
    return turn, _weight(m, role, name, where)


def _weight(m: dict[str, Any], role: str, name: str, where: str) -> int | None:
    """An assistant turn's weight: 1 (trained, the default) or 0; any other value, or a weight on another role,
    is an error (a boolean is not a weight)."""
    if "weight" not in m:
        return 1 if role == "assistant" else None
    weight = m["weight"]
    if role != "assistant":
        raise InstructuneError(f"{name}.weight is on a {role} message; only assistant turns are weighted", where)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise InstructuneError(f"{name}.weight is {kind(weight)}; expected 0 (not trained) or 1 (trained)", where)
    return int(weight)


def _tool_calls(calls: Any, name: str, where: str) -> list[dict[str, Any]]:
    """OpenAI tool calls ({id, type: "function", function: {name, arguments: JSON text}}) with the arguments parsed
    into an object: transformers' chat templates render `arguments` as a mapping (`tojson`)."""
    if not isinstance(calls, list) or not calls:
        raise InstructuneError(f"{name} is {kind(calls) if calls != [] else 'an empty list'}; expected a list of "
                               "{id, type, function} objects", where)
    out = []
    for j, call in enumerate(calls):
        here = f"{name}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise InstructuneError(f"{here} has no `function` with a `name`; expected {{id, type: \"function\", "
                                   "function: {name, arguments}}", where)
        if call.get("type", "function") != "function":
            raise InstructuneError(f"{here}.type is {call['type']!r}; expected \"function\"", where)
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise InstructuneError(f"{here}.function.arguments is not JSON ({e.msg})", where) from None
        if not isinstance(arguments, dict):
            raise InstructuneError(f"{here}.function.arguments is {kind(arguments)}; expected a JSON object", where)
        out.append({**({"id": call["id"]} if isinstance(call.get("id"), str) else {}), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def check_tools(tools: Any, where: str) -> list[dict[str, Any]] | None:
    """The record's `tools`: a list of {type: "function", function: {name, description?, parameters?}}."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise InstructuneError(f"tools is {kind(tools) if tools != [] else 'an empty list'}; expected a list of "
                               "{type: \"function\", function: {name, description, parameters}} objects", where)
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise InstructuneError(f"tools[{j}] has no `function` with a `name`", where)
        if tool.get("type", "function") != "function":
            raise InstructuneError(f"tools[{j}].type is {tool['type']!r}; expected \"function\"", where)
        if not isinstance(fn.get("parameters", {}), dict):
            raise InstructuneError(f"tools[{j}].function.parameters is {kind(fn['parameters'])}; expected a JSON "
                                   "schema object", where)
    return tools


def _check_tool_results(turns: list[dict[str, Any]], where: str) -> None:
    """A `tool` message answers a call: an assistant turn with `tool_calls` comes before it."""
    called = False
    for i, t in enumerate(turns):
        called = called or "tool_calls" in t
        if t["role"] == "tool" and not called:
            raise InstructuneError(f"messages[{i}] is a tool result, but no assistant turn before it calls a tool", where)


def answer_text(turn: dict[str, Any]) -> str:
    """An assistant turn as the reference answer of evaluation: its content, or (a turn that only calls tools) its
    calls as JSON lines of {name, arguments}."""
    if turn.get("content"):
        return turn["content"].strip()
    return "\n".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                     for c in turn["tool_calls"])
