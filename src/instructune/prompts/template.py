"""Turning a record into a prompt→completion pair: a library or user template in a Jinja sandbox, or the record's own shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..config import TaskConfig, TemplateConfig
from ..data.load import Record
from ..data.shapes import detect_shape
from ..errors import InstructuneError
from .library import DEFAULT_TEMPLATE, DEFAULT_VARIABLES, FIELDS, LIBRARY, Template


@dataclass
class Pair:
    """What the model sees (chat `messages`, the last one the user's) and what it should answer (`completion`)."""

    messages: list[dict[str, str]]
    completion: str
    where: str = ""
    record: dict[str, Any] = field(default_factory=dict)


def format_entities(entities) -> str:
    if isinstance(entities, str):
        return entities
    if not entities:
        return "none"
    return ", ".join(f"{e['text']}: {e['type']}" for e in entities)


_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_ENV.filters["format_entities"] = format_entities


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

    @property
    def separator(self) -> str:
        """Joins prompt and completion for plain (non-chat) models; may use the task's constant variables."""
        if self.template is None:
            return "\n"
        return _ENV.from_string(self.template.separator).render({**DEFAULT_VARIABLES.get(self.type, {}), **self.variables})

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
            pair = _shaped_pair(record)
        else:
            ctx = self.context(record)
            pair = Pair([{"role": "user", "content": self._render(self.template.prompt, ctx, record, "prompt")}],
                        self._render(self.template.completion, ctx, record, "completion").strip(), record.where, record.data)
        if not pair.completion.strip():
            raise InstructuneError("empty completion: the training target of this record renders to nothing", record.where)
        if self.system_prompt and pair.messages[0]["role"] != "system":
            pair.messages.insert(0, {"role": "system", "content": self.system_prompt})
        return pair

    def prompt_only(self, record: Record) -> list[dict[str, str]]:
        """The prompt messages for a record with no answer (inference)."""
        if self.template is None:
            return _shaped_pair(record, need_completion=False).messages
        ctx = self.context(record)
        messages = [{"role": "user", "content": self._render(self.template.prompt, ctx, record, "prompt")}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def context(self, record: Record) -> dict[str, Any]:
        ctx = {**DEFAULT_VARIABLES.get(self.type, {}), **self.variables, **record.data}
        for var, name in self.fields.items():
            if name not in record.data:
                raise InstructuneError(f"record has no field {name!r} (mapped to template variable {var!r}); "
                                       f"its fields are {sorted(record.data)}", record.where)
            ctx[var] = record.data[name]
        if self.choices is not None:
            ctx["choices"] = self.choices
        return ctx

    def _render(self, source: str, ctx: dict, record: Record, part: str) -> str:
        try:
            return _ENV.from_string(source).render(ctx)
        except UndefinedError as e:
            raise InstructuneError(f"the {self.task!r} template's {part} uses a field this record lacks ({e.message}); "
                                   f"record fields are {sorted(record.data)}", record.where) from None
        except TemplateError as e:
            raise InstructuneError(f"template error in the {self.task!r} {part}: {e}", record.where) from None

    def answer_field(self) -> str:
        """The record field holding the label (for stratified splits and default choices)."""
        name = FIELDS[self.type][-1]
        return self.fields.get(name, name)


def build_task_template(task: TaskConfig, shape: str, default_max_new_tokens: int) -> TaskTemplate:
    from .library import MAX_NEW_TOKENS

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
        template = LIBRARY[DEFAULT_TEMPLATE[task.type]]
    else:
        template = None
    return TaskTemplate(task=task.name, type=task.type, template=template, fields=dict(task.fields),
                        variables=dict(task.variables), choices=task.choices, system_prompt=task.system_prompt,
                        max_new_tokens=task.max_new_tokens or MAX_NEW_TOKENS.get(task.type, default_max_new_tokens))


def _check_syntax(template: Template, task: str) -> None:
    for part in ("prompt", "completion"):
        try:
            _ENV.parse(getattr(template, part))
        except TemplateError as e:
            raise InstructuneError(f"template {part} is not valid Jinja: {e}", f"tasks.{task}.template.{part}") from None


def _shaped_pair(record: Record, need_completion: bool = True) -> Pair:
    d, shape = record.data, detect_shape(record.data)
    if shape == "prompt_completion":
        prompt = d["prompt"]
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        completion = d["completion"]
        if isinstance(completion, list):  # conversational prompt-completion: [{"role": "assistant", ...}]
            completion = completion[-1]["content"]
        return Pair(messages, str(completion or "").strip(), record.where, d)
    if shape == "alpaca":
        user = d["instruction"] + (f"\n\n{d['input']}" if d.get("input") else "")
        return Pair([{"role": "user", "content": user}], str(d.get("output") or "").strip(), record.where, d)
    if shape == "messages":
        messages = [{"role": m.get("role", ""), "content": m.get("content", "")} for m in d["messages"]]
        if need_completion:
            if not messages or messages[-1]["role"] != "assistant":
                raise InstructuneError("a `messages` record must end with the assistant's answer", record.where)
            return Pair(messages[:-1], messages[-1]["content"].strip(), record.where, d)
        return Pair(messages if messages[-1]["role"] != "assistant" else messages[:-1], "", record.where, d)
    raise InstructuneError(f"record is neither prompt/completion, Alpaca nor chat messages (fields {sorted(d)}); "
                           "give the task a `template`", record.where)
