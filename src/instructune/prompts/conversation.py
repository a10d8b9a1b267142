"""A conversation rendered by the model's chat template and cut where its trained assistant turns begin and end, so
that every weighted assistant turn (its text and its end-of-turn token, as the template writes them) is trained and
nothing else is; `tools` and tool calls go through the template's own tool support.

A turn's text is what the template adds for it: from the generation prompt before the turn (`add_generation_prompt`)
to the conversation that ends with it, less trailing whitespace, the same rule as a single completion
(`PromptFormat.completion_text`). That needs a template that renders earlier turns the same whatever follows them;
one that rewrites history (drops reasoning, say) is refused for a conversation that trains earlier turns."""

from __future__ import annotations

import re
from typing import Any

from jinja2 import TemplateError

from ..errors import InstructuneError
from .template import Pair


def template_source(tok, tools: bool) -> str:
    """The chat template transformers would use (a tokenizer may name several: `tool_use` for tools)."""
    source = tok.chat_template
    if isinstance(source, dict):
        source = source.get("tool_use" if tools else "default") or source.get("default") or next(iter(source.values()))
    return source or ""


def conversation_features(pair: Pair) -> str:
    """What makes a pair a conversation rather than one prompt and one completion, in words for an error."""
    calls = any("tool_calls" in m for m in pair.messages + [pair.answer or {}])
    parts = [f"{len(pair.trained)} earlier trained assistant turn(s)" if pair.trained else "",
             "tools" if pair.tools else "", "tool calls" if calls else "",
             "a final assistant turn of weight 0" if not pair.answer_weight else ""]
    return ", ".join(p for p in parts if p)


def check_tool_support(tok, pair: Pair) -> None:
    """A conversation with tools or tool calls needs a template that reads them: otherwise the calls would vanish
    from the text (or render as whatever the template makes of a missing `content`), silently."""
    calls = any("tool_calls" in m for m in pair.messages + [pair.answer or {}])
    results = any(m["role"] == "tool" for m in pair.messages)
    if not (pair.tools or calls or results):
        return
    source = template_source(tok, bool(pair.tools))
    model = getattr(tok, "name_or_path", "") or "this model"
    for wanted, reads in ((pair.tools, r"\btools\b"), (calls, r"\btool_calls\b"), (results, r"['\"]tool['\"]")):
        if wanted and not re.search(reads, source):
            what = {r"\btools\b": "`tools`", r"\btool_calls\b": "assistant `tool_calls`"}.get(reads, "`tool` messages")
            raise InstructuneError(f"the chat template of {model} has no tool support: it never reads {what}; "
                                   "train a model whose chat template renders tools, or drop them", pair.where)


def render(tok, turns: list[dict[str, Any]], tools, prompt: bool, where: str) -> str:
    """The template's text for `turns` (with the generation prompt after them when `prompt`)."""
    try:
        return tok.apply_chat_template(turns, tools=tools, add_generation_prompt=prompt, tokenize=False)
    except TemplateError as e:  # the template's own raise_exception, or a turn it cannot take
        raise InstructuneError(f"the chat template cannot render this conversation: {e}", where) from None


def segments(tok, pair: Pair) -> tuple[list[tuple[str, bool]], str]:
    """The conversation's text before its final assistant turn, in pieces (text, trained: an earlier assistant turn
    of weight 1), and the final turn's text. The pieces join into the prompt generation sees for the final turn."""
    check_tool_support(tok, pair)
    turns = pair.messages + [pair.answer or {"role": "assistant", "content": pair.completion}]
    final, where = len(turns) - 1, pair.where
    full = render(tok, turns, pair.tools, False, where)
    pieces, at = [], 0
    for i in list(pair.trained) + [final]:
        if i == 0:  # a template renders no conversation of no turns: the turn's start is unknown
            raise InstructuneError("messages[0] is a trained assistant turn with nothing before it; give it "
                                   "\"weight\": 0 or start the conversation with the user's turn", where)
        before = render(tok, turns[:i], pair.tools, True, where)
        upto = (render(tok, turns[:i + 1], pair.tools, False, where) if i < final else full).rstrip("\n ")
        if not (full.startswith(before) and full.startswith(upto)) or len(before) < at:
            raise InstructuneError(f"the chat template renders the turns before messages[{i}] differently once later "
                                   "turns follow (it rewrites history), so its trained turns cannot be cut out of the "
                                   "conversation; give the earlier assistant turns weight 0", where)
        pieces += [(full[at:len(before)], False), (full[len(before):len(upto)], True)]
        at = len(upto)
    answer = pieces.pop()[0]
    return pieces, answer


def turn_texts(tok, pair: Pair) -> list[tuple[str, str]]:
    """(role, text) of every turn as the template renders it in the whole conversation (the first carries what the
    template writes before it), for `data lint`'s per-turn token counts."""
    turns = pair.messages + [pair.answer or {"role": "assistant", "content": pair.completion}]
    full = render(tok, turns, pair.tools, False, pair.where).rstrip("\n ")
    out, at = [], 0
    for i, turn in enumerate(turns):
        end = len(render(tok, turns[:i + 1], pair.tools, False, pair.where)) if i < len(turns) - 1 else len(full)
        out.append((turn["role"], full[at:end]))
        at = end
    return out


def turn_report(tok, pair: Pair, cut: int, cut_end: int) -> list[dict[str, Any]]:
    """Per turn of an encoded conversation: role, tokens (each turn tokenized as rendered), trained, and tokens cut
    to fit `train.max_length`: `encode` keeps the first token and cuts the oldest after it, then (`cut_end` of the
    `cut` tokens) the final turn's end if it still does not fit."""
    texts = turn_texts(tok, pair)
    trained = set(pair.trained) | ({len(texts) - 1} if pair.answer_weight else set())
    out, at = [], 0
    for i, (role, text) in enumerate(texts):
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        lost = cut_end if i == len(texts) - 1 else max(0, min(at + n, 1 + cut - cut_end) - max(at, 1))
        out.append({"role": role, "tokens": n, "trained": i in trained, "cut": lost})
        at += n
    return out
