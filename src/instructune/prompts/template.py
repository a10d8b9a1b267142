"""Turning a record into a prompt→completion pair: a library or user template in a bounded Jinja sandbox, or the
record's own shape; every record is checked (types, chat turns, labels among the choices) before it becomes a pair."""

from __future__ import annotations

import functools
import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg
from jinja2.visitor import NodeTransformer

from .. import tasktypes
from ..config import LimitsConfig, TaskConfig, TemplateConfig
from ..data.load import Record
from ..data.openai_chat import Conversation, answer_text, check_conversation, check_tools
from ..data.shapes import check_entities, check_messages, detect_shape, text_value
from ..errors import InstructuneError
from .library import LIBRARY, Template

_DEFAULT_LIMITS = LimitsConfig()
MAX_RANGE = 100_000  # longest range() a template may build (jinja2's own sandbox cap)
MAX_POW_BITS = 100_000  # an integer power larger than this many bits is refused before it is computed


@dataclass
class Pair:
    """What the model sees (chat `messages`, the last one the user's) and what it should answer (`completion`)."""

    messages: list[dict[str, Any]]
    completion: str
    where: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    # An OpenAI chat record may train more than its last turn (see data/openai_chat.py, prompts/conversation.py):
    tools: list[dict[str, Any]] | None = None  # its `tools`, rendered by the chat template's tool support
    trained: tuple[int, ...] = ()  # earlier assistant turns (indices into `messages`) trained as well (weight 1)
    answer: dict[str, Any] | None = None  # the final assistant turn when it is more than `completion` (tool calls)
    answer_weight: int = 1  # 0: the final assistant turn is context, not trained (it stays evaluation's reference)

    @property
    def conversation(self) -> bool:
        """Whether training needs the whole conversation rendered turn by turn (not one prompt and one completion)."""
        return bool(self.trained or self.tools or self.answer or not self.answer_weight)


def format_entities(entities) -> str:
    if isinstance(entities, str):
        return entities
    if not entities:
        return "none"
    return ", ".join(f"{e['text']}: {e['type']}" for e in entities)


class RenderLimit(Exception):
    """A render went past a limit (output size, time, range length, a value's size): reported with the record."""


class _Budget(threading.local):
    """The limits of the render in progress (per thread); outside a render only the size caps apply."""

    active = False
    chars = 0
    max_chars = _DEFAULT_LIMITS.max_render_chars
    max_seconds = _DEFAULT_LIMITS.max_render_seconds
    deadline = math.inf


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every way to spend unbounded time or memory capped: `*`, `**`, `%`, `+` and `~`
    check the size of their result before building it, `range()` is capped, every loop and call checks the clock,
    and everything written out (expressions and literal text, in blocks and macros too) counts towards
    `max_render_chars`."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})  # also keeps them from being folded at compile time

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.budget = _Budget()
        self.finalize = self._finalize
        self.globals["range"] = self._range
        self.filters = {name: self._guard_filter(name, fn) for name, fn in self.filters.items()}
        self.filters["format_entities"] = self._guard_filter("format_entities", format_entities)

    # limits -----------------------------------------------------------------------------------------------------
    def tick(self) -> None:
        if time.monotonic() > self.budget.deadline:
            raise RenderLimit(f"took longer than max_render_seconds = {self.budget.max_seconds:g} "
                              "(limits.max_render_seconds)")

    def _too_big(self, size: float, what: str) -> None:
        if size > self.budget.max_chars:
            raise RenderLimit(f"{what} would be {size:,.0f} characters (or items), over the limit "
                              f"max_render_chars = {self.budget.max_chars:,} (limits.max_render_chars)")

    def _size(self, value: Any) -> float:
        """Characters `value` becomes as text (lists and dicts counted through), stopping once past the limit."""
        total, stack, cap = 0, [value], self.budget.max_chars
        while stack and total <= cap:
            v = stack.pop()
            if isinstance(v, str):
                total += len(v)
            elif isinstance(v, (list, tuple, set, frozenset, range)):
                total += 2 + 2 * len(v)
                if not isinstance(v, range):
                    stack.extend(v)
            elif isinstance(v, dict):
                total += 2 + 4 * len(v)
                stack.extend(v.keys())
                stack.extend(v.values())
            else:
                total += 24  # numbers, undefined, macros: short when printed
        return total

    def _finalize(self, value: Any) -> Any:
        self.tick()
        size = self._size(value)
        self._too_big(size, "an output")
        if self.budget.active:
            self.budget.chars += size
            self._too_big(self.budget.chars, "the rendered text")
        return value

    def _range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > MAX_RANGE:
            raise RenderLimit(f"range() of {len(rng):,} numbers is over the limit of {MAX_RANGE:,}")
        return rng

    def guard_iter(self, iterable):
        """Every `{% for %}` loop iterates through this: the clock is checked at each item."""
        for item in iterable:
            self.tick()
            yield item

    def guard_concat(self, *parts) -> str:
        """The `~` operator, refused before joining when the result would be over the size limit."""
        self.tick()
        self._too_big(sum(self._size(p) for p in parts), "a `~` result")
        return "".join(map(str, parts))

    def guard_literal(self, text: str) -> str:
        """Literal template text, routed through finalize so that text repeated by loops counts too."""
        return text

    # hooks of the sandbox ---------------------------------------------------------------------------------------
    def _parse(self, source, name, filename):
        return _Guards(self).visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self._too_big(len(seq) * n, f"a {type(seq).__name__} times {n:,}")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            bits = right * math.log2(abs(left))
            if bits > MAX_POW_BITS:
                raise RenderLimit(f"{left} ** {right} would have {bits:,.0f} bits (limit {MAX_POW_BITS:,})")
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, right if isinstance(right, tuple) else (right,), {})
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            self._too_big(len(left) + len(right), "a `+` result")
        result = super().call_binop(context, operator, left, right)
        self._too_big(self._size(result), f"a `{operator}` result")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        __self.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            __self._check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        __self._too_big(__self._size(result), "a call's result")
        return result

    def wrap_str_format(self, value):
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None

        def checked(*args, **kwargs):
            self._check_format(value.__self__, args, kwargs)
            return fmt(*args, **kwargs)
        return checked

    def _check_format(self, fmt: str, args, kwargs) -> None:
        """`%`-formatting and str.format: refuse widths or precisions (written or passed as `*`/`{}`) over the limit."""
        widths = [int(d) for d in re.findall(r"\d+", fmt)]
        if re.search(r"\*|:[^}]*\{", fmt):
            widths += [a for a in [*args, *kwargs.values()] if isinstance(a, int)]
        self._too_big(max(widths, default=0), "a format width")
        self._too_big(len(fmt) + sum(self._size(a) for a in [*args, *kwargs.values()]), "a formatted text")

    def _check_str_method(self, s: str, name: str, args, kwargs) -> None:
        if name in ("center", "ljust", "rjust", "zfill"):
            width = args[0] if args else kwargs.get("width", 0)
            if isinstance(width, int):
                self._too_big(width, f"str.{name}()")
        elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            self._too_big(_replaced_length(s, args[0], args[1]), "str.replace()")
        elif name == "join" and isinstance(args[0] if args else None, (list, tuple, str)):
            self._too_big(self._size(args[0]) + len(s) * len(args[0]), "str.join()")
        elif name == "expandtabs":
            size = args[0] if args and isinstance(args[0], int) else 8
            self._too_big(len(s) + size * s.count("\t"), "str.expandtabs()")

    def _guard_filter(self, name: str, fn):
        """A filter with the clock checked, its result's size checked, and, for the filters that can grow their
        input by an argument (center, indent, replace, join, format, batch, slice, sum, tojson, wordwrap), the
        size checked before it runs."""
        skip = 1 if _PassArg.from_obj(fn) is not None else 0  # context / eval context / environment comes first

        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            self.tick()
            self._check_filter(name, args[skip:], kwargs)
            result = fn(*args, **kwargs)
            if not hasattr(result, "__next__"):  # a generator is bounded by what consumes it
                self._too_big(self._size(result), f"the `{name}` filter's result")
            return result
        return guarded

    def _check_filter(self, name: str, args: tuple, kwargs: dict) -> None:
        value, rest = (args[0] if args else None), args[1:]

        def arg(i: int, key: str, default=None):
            return rest[i] if len(rest) > i else kwargs.get(key, default)

        if name == "center" and isinstance(arg(0, "width", 80), int):
            self._too_big(arg(0, "width", 80), "center()")
        elif name == "indent":
            width = arg(0, "width", 4)
            prefix = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            self._too_big(len(str(value)) + prefix * (str(value).count("\n") + 1), "indent()")
        elif name == "replace" and isinstance(arg(0, "old"), str) and isinstance(arg(1, "new"), str):
            self._too_big(_replaced_length(str(value), arg(0, "old"), arg(1, "new")), "replace()")
        elif name in ("join", "sum", "pprint", "string", "tojson", "list"):
            sep = arg(0, "d", "") if name == "join" else ""
            n = len(value) if isinstance(value, (list, tuple, str, dict)) else 0
            self._too_big(self._size(value) + len(str(sep)) * n, f"{name}()")
            if name == "tojson" and isinstance(arg(0, "indent"), int):
                self._too_big(arg(0, "indent") * self._size(value), "tojson()")
        elif name == "format" and isinstance(value, str):
            self._check_format(value, rest, kwargs)
        elif name in ("batch", "slice") and isinstance(rest[0] if rest else None, int):
            self._too_big(rest[0], f"{name}()")
        elif name == "wordwrap":
            s, wrap = str(value), arg(3, "wrapstring") or "\n"
            width = arg(0, "width", 79)
            lines = len(s) // max(width, 1) + s.count("\n") + 1 if isinstance(width, int) else len(s)
            self._too_big(len(s) + len(str(wrap)) * lines, "wordwrap()")


def _replaced_length(s: str, old: str, new: str) -> int:
    return len(s) + (s.count(old) if old else len(s) + 1) * max(len(new) - len(old), 0)


class _Guards(NodeTransformer):
    """Rewrites a parsed template so that loops, `~` and literal text go through the sandbox's guards."""

    def __init__(self, env: BoundedSandbox):
        self.env = env

    def _call(self, name: str, args: list, node: nodes.Node) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None, lineno=node.lineno)
        return call.set_environment(self.env)

    def visit_For(self, node: nodes.For):
        node = self.generic_visit(node)
        node.iter = self._call("guard_iter", [node.iter], node)
        return node

    def visit_Concat(self, node: nodes.Concat):
        node = self.generic_visit(node)
        return self._call("guard_concat", node.nodes, node)

    def visit_TemplateData(self, node: nodes.TemplateData):
        return self._call("guard_literal", [nodes.Const(node.data, lineno=node.lineno)], node)


_ENV = BoundedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@functools.lru_cache(maxsize=256)
def _compiled(source: str):
    return _ENV.from_string(source)


def render(source: str, ctx: dict, max_chars: int, max_seconds: float) -> str:
    """Render `source` over `ctx` within the limits; RenderLimit, or the template's own errors, when it cannot."""
    template = _compiled(source)
    budget = _ENV.budget
    budget.active, budget.chars, budget.max_chars, budget.max_seconds = True, 0, max_chars, max_seconds
    budget.deadline = time.monotonic() + max_seconds
    try:
        return template.render(ctx)
    finally:
        budget.active, budget.deadline = False, math.inf
        budget.max_chars, budget.max_seconds = _DEFAULT_LIMITS.max_render_chars, _DEFAULT_LIMITS.max_render_seconds


@dataclass
class TaskTemplate:
    """Everything needed to render one task's records the same way in training, evaluation, inference and export."""

    task: str
    type: str
    template: Template | None  # None: the records are already prompt/completion, Alpaca or chat messages
    fields: dict[str, str]
    variables: dict[str, Any]
    choices: list[str] | None = None
    system_prompt: str | None = None
    max_new_tokens: int = 64
    max_render_chars: int = _DEFAULT_LIMITS.max_render_chars
    max_render_seconds: float = _DEFAULT_LIMITS.max_render_seconds
    strict_choices: bool = False  # choices given in the config: a label outside them is an error in `pair`

    @property
    def separator(self) -> str:
        """Joins prompt and completion for plain (non-chat) models; may use the task's constant variables."""
        if self.template is None:
            return "\n"
        ctx = {**tasktypes.get(self.type).variables, **self.variables}
        return self._render(self.template.separator, ctx, Record({}, f"tasks.{self.task}.template"), "separator")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["template"] = asdict(self.template) if self.template else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TaskTemplate":
        d = dict(d)
        d["template"] = Template(**d["template"]) if d.get("template") else None
        return cls(**d)

    def pair(self, record: Record) -> Pair:
        """The prompt→completion pair of a record; bad records fail here, naming the record's file and line."""
        if self.template is None:
            pair = _shaped_pair(record, integer_ok=tasktypes.get(self.type).integer_answer)
        else:
            ctx = self.context(record, need_answer=True)
            prompt = self._render(self.template.prompt, ctx, record, "prompt")
            completion = self._render(self.template.completion, ctx, record, "completion").strip()
            pair = Pair([{"role": "user", "content": prompt}], completion, record.where, record.data)
        if not pair.completion.strip():
            raise InstructuneError("empty completion: the training target of this record renders to nothing", record.where)
        if self.strict_choices:
            self.check_label(pair.completion, record.where)
        if self.system_prompt and pair.messages[0]["role"] != "system":
            pair.messages.insert(0, {"role": "system", "content": self.system_prompt})
        return pair

    def check_label(self, label: str, where: str) -> None:
        """A classification label must be one of the task's choices (compared without surrounding whitespace);
        `pair` checks this for choices given in the config, the caller for choices taken from the training labels."""
        if not tasktypes.get(self.type).choices or self.choices is None:
            return
        if label.strip() not in {c.strip() for c in self.choices}:
            raise InstructuneError(f"label {label.strip()!r} is not among the task's choices {list(self.choices)}; "
                                   "fix the label or add it to `choices`", where)

    def prompt_only(self, record: Record) -> list[dict[str, str]]:
        """The prompt messages for a record with no answer (inference)."""
        return self.inference_pair(record).messages

    def inference_pair(self, record: Record) -> Pair:
        """A record with no answer as a pair: its prompt messages and, for an OpenAI chat record, its `tools` (the
        chat template shows them to the model, as in training), read once."""
        if self.template is None:
            return _shaped_pair(record, need_completion=False)
        ctx = self.context(record)
        messages = [{"role": "user", "content": self._render(self.template.prompt, ctx, record, "prompt")}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return Pair(messages, "", record.where, record.data)

    def context(self, record: Record, need_answer: bool = False) -> dict[str, Any]:
        """The template's variables for a record, each record field the template renders checked for its type."""
        kind = tasktypes.get(self.type)
        ctx = {**kind.variables, **self.variables, **record.data}
        for var, name in self.fields.items():
            if name not in record.data:
                raise InstructuneError(f"record has no field {name!r} (mapped to template variable {var!r}); "
                                       f"its fields are {sorted(record.data)}", record.where)
            ctx[var] = record.data[name]
        if self.choices is not None:
            ctx["choices"] = self.choices
        used = _variables(self.template.prompt) | _variables(self.template.completion)
        answer = kind.answer
        for var in sorted(used):
            name = self.fields.get(var, var)
            from_record = var in self.fields or (var in record.data and not (var == "choices" and self.choices))
            if var == answer and need_answer and not from_record:
                what = "label" if kind.choices else "answer"
                raise InstructuneError(f"no {what}: the record has no field {name!r}; its fields are "
                                       f"{sorted(record.data)}", record.where)
            if not from_record:
                continue
            value = ctx[var]
            if var == answer and kind.entity_answer:
                check_entities(value, name, record.where)
            elif var == answer or var in kind.inputs:
                text_value(value, name, record.where, var == answer and kind.integer_answer, var != answer)
            elif value is None:  # a field of the user's own template: any JSON value but null
                raise InstructuneError(f"field {name!r} is null (the template renders it)", record.where)
        return ctx

    def _render(self, source: str, ctx: dict, record: Record, part: str) -> str:
        try:
            text = render(source, ctx, self.max_render_chars, self.max_render_seconds)
        except RenderLimit as e:
            raise InstructuneError(f"the {self.task!r} template's {part} {e}; refused", record.where) from None
        except UndefinedError as e:
            raise InstructuneError(f"the {self.task!r} template's {part} uses a field this record lacks ({e.message}); "
                                   f"record fields are {sorted(record.data)}", record.where) from None
        except TemplateError as e:
            raise InstructuneError(f"template error in the {self.task!r} {part}: {e}", record.where) from None
        except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as e:
            # a user template meeting a value it cannot handle: the record or the template is the user's input
            raise InstructuneError(f"the {self.task!r} template's {part} failed on this record: "
                                   f"{type(e).__name__}: {str(e)[:200]}", record.where) from None
        if part == "prompt" and not text.strip():
            raise InstructuneError(f"the {self.task!r} template's prompt renders empty for this record", record.where)
        return text

    def answer_field(self) -> str:
        """The record field holding the label (for stratified splits and default choices)."""
        name = tasktypes.get(self.type).answer
        return self.fields.get(name, name)


@functools.lru_cache(maxsize=256)
def _variables(source: str) -> frozenset[str]:
    """The variables a template reads (the record fields it renders, besides constants)."""
    return frozenset(meta.find_undeclared_variables(_ENV.parse(source)))


def build_task_template(task: TaskConfig, shape: str, default_max_new_tokens: int,
                        limits: LimitsConfig | None = None) -> TaskTemplate:
    kind = tasktypes.get(task.type)
    limits = limits or _DEFAULT_LIMITS
    template: Template | None
    if isinstance(task.template, TemplateConfig):
        template = Template(task.template.prompt, task.template.completion, task.template.separator)
        _check_syntax(template, task.name)
    elif isinstance(task.template, str):
        if task.template not in LIBRARY:
            names = [n for n in LIBRARY if n.startswith(task.type + "/")]
            raise InstructuneError(f"unknown template {task.template!r}; for {task.type} choose one of {names} "
                                   f"or give {{prompt, completion}}", f"tasks.{task.name}.template")
        template = LIBRARY[task.template]
    elif shape == "raw":
        template = LIBRARY[kind.default_template]
    else:
        template = None
    return TaskTemplate(task=task.name, type=task.type, template=template, fields=dict(task.fields),
                        variables=dict(task.variables), choices=task.choices, system_prompt=task.system_prompt,
                        max_new_tokens=task.max_new_tokens or kind.max_new_tokens or default_max_new_tokens,
                        max_render_chars=limits.max_render_chars, max_render_seconds=limits.max_render_seconds,
                        strict_choices=task.choices is not None)


def _check_syntax(template: Template, task: str) -> None:
    for part in ("prompt", "completion", "separator"):
        try:
            _ENV.parse(getattr(template, part))
        except TemplateError as e:
            raise InstructuneError(f"template {part} is not valid Jinja: {e}", f"tasks.{task}.template.{part}") from None


def _shaped_pair(record: Record, need_completion: bool = True, integer_ok: bool = False) -> Pair:
    """A prompt/completion, Alpaca or chat record as a pair, each value checked (see data/shapes.py)."""
    d, shape, where = record.data, detect_shape(record.data), record.where
    if shape == "prompt_completion":
        prompt = d["prompt"]
        if isinstance(prompt, list):  # conversational prompt: the turns before the answer
            messages = check_messages(prompt, where, "prompt", last="user")
        else:
            messages = [{"role": "user", "content": _non_empty(text_value(prompt, "prompt", where), "prompt", where)}]
        if not need_completion:
            return Pair(messages, "", where, d)
        completion = d["completion"]
        if isinstance(completion, list):  # conversational prompt-completion: [{"role": "assistant", ...}]
            turns = check_messages(completion, where, "completion", roles=("assistant",), need_user=False)
            return Pair(messages, "\n".join(t["content"] for t in turns).strip(), where, d)
        return Pair(messages, text_value(completion, "completion", where, integer_ok, empty_ok=False).strip(), where, d)
    if shape == "alpaca":
        instruction = _non_empty(text_value(d["instruction"], "instruction", where), "instruction", where)
        extra = d.get("input")
        extra = "" if extra is None else text_value(extra, "input", where)  # null input: the record has none
        messages = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra.strip() else "")}]
        if not need_completion:
            return Pair(messages, "", where, d)
        return Pair(messages, text_value(d["output"], "output", where, integer_ok, empty_ok=False).strip(), where, d)
    if shape == "messages":
        if need_completion:
            return conversation_pair(check_conversation(d, where), where, d)
        messages = check_messages(d["messages"], where, last=None)  # inference: the record's tools go with it
        return Pair(messages if messages[-1]["role"] != "assistant" else messages[:-1], "", where, d,
                    tools=check_tools(d.get("tools"), where))
    raise InstructuneError(f"record is neither prompt/completion, Alpaca nor chat messages (fields {sorted(d)}); "
                           "give the task a `template` (a chat record needs a `messages` list: OpenAI's "
                           "missing_messages_list)", where)


def conversation_pair(convo: Conversation, where: str, record: dict[str, Any]) -> Pair:
    """A checked OpenAI chat record as a pair: the final assistant turn is the completion (evaluation's reference),
    the turns before it the prompt; earlier assistant turns of weight 1 are trained too."""
    *before, last = convo.messages
    trained = tuple(i for i, w in enumerate(convo.weights[:-1]) if w)
    rich = set(last) - {"role", "content"}  # tool calls (or a name): rendered from the turn itself
    return Pair(before, answer_text(last), where, record, tools=convo.tools, trained=trained,
                answer=last if rich else None, answer_weight=convo.weights[-1])


def _non_empty(text: str, name: str, where: str) -> str:
    if not text.strip():
        raise InstructuneError(f"field {name!r} is empty", where)
    return text
