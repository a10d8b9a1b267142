"""The Go-template subset an Ollama TEMPLATE needs here, both ways: built from a chat template by rendering it with
placeholders, and evaluated (`render_go_template`) so tests can prove it gives the training prompt exactly."""

from __future__ import annotations

import os
import re

from ..errors import InstructuneError

_TAG = re.compile(r"{{-?\s*(if \.System|else|end|\.System|\.Prompt)\s*-?}}")


def render_go_template(template: str, system: str | None, prompt: str) -> str:
    """Evaluate `{{ if .System }}...{{ else }}...{{ end }}` (not nested), `{{ .System }}` and `{{ .Prompt }}`
    the way Go's text/template does (an empty system prompt is false); anything else inside `{{ }}` is refused."""
    if "{{" in _TAG.sub("", template):
        raise InstructuneError("the template uses Go-template actions beyond {{ if .System }}, {{ else }}, {{ end }}, "
                               "{{ .System }} and {{ .Prompt }}")
    out, branch = [], None  # branch: None outside an if; True/False: whether the current branch is taken
    pos = 0
    for m in _TAG.finditer(template):
        if branch is not False:
            out.append(template[pos:m.start()])
        action = m.group(1)
        if action == "if .System":
            if branch is not None:
                raise InstructuneError("nested {{ if }} is not supported")
            branch = bool(system)
        elif action == "else":
            branch = not bool(system)
        elif action == "end":
            branch = None
        elif branch is not False:
            out.append((system or "") if action == ".System" else prompt)
        pos = m.end()
    if branch is not None:
        raise InstructuneError("{{ if }} without {{ end }}")
    out.append(template[pos:])
    return "".join(out)


def _check_literal(text: str) -> str:
    if "{{" in text:
        raise InstructuneError("the prompt format contains '{{', which an Ollama TEMPLATE would read as an action")
    return text


def go_template(render, prefix: str = "", suffix: str = "") -> str:
    """An Ollama TEMPLATE equivalent to `render(system, user) -> prompt text` for one system prompt (or none) and
    one user message; the user's text is `prefix + {{ .Prompt }} + suffix`. Refused when no such template exists
    (a chat template that does more than place the two strings)."""
    sys_mark, user_mark = f"\x00SYS{os.getpid()}\x00", f"\x00USER{os.getpid()}\x00"
    plain = render(None, user_mark)
    with_sys = render(sys_mark, user_mark)
    if plain.count(user_mark) != 1 or with_sys.count(user_mark) != 1 or with_sys.count(sys_mark) != 1 \
            or with_sys.index(sys_mark) > with_sys.index(user_mark):
        raise InstructuneError("the chat template does not place one system prompt before one user message as text; "
                               "no equivalent Ollama TEMPLATE can be written")
    p0, p1 = plain.split(user_mark)
    s0, rest = with_sys.split(sys_mark)
    s1, s2 = rest.split(user_mark)
    if p1 != s2:
        raise InstructuneError("the chat template ends a user message differently with and without a system prompt")
    common = os.path.commonprefix([s0, p0])
    s0, p0r = s0[len(common):], p0[len(common):]
    tail = os.path.commonprefix([s1[::-1], p0r[::-1]])[::-1]
    s1, p0r = s1[:len(s1) - len(tail)], p0r[:len(p0r) - len(tail)]
    other = "{{ else }}" + _check_literal(p0r) if p0r else ""
    template = (_check_literal(common) + "{{ if .System }}" + _check_literal(s0) + "{{ .System }}" + _check_literal(s1)
                + other + "{{ end }}" + _check_literal(tail) + _check_literal(prefix) + "{{ .Prompt }}"
                + _check_literal(suffix) + _check_literal(p1))
    for system in (None, "Answer briefly."):  # the template must give the chat template's text, with and without
        for user in ("hello", "two\nlines"):
            if render_go_template(template, system, user) != render(system, prefix + user + suffix):
                raise InstructuneError("could not write an Ollama TEMPLATE equivalent to the chat template")
    return template
