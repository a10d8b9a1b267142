"""The manifest (instructune.json) saved beside a fine-tuned model: how to render its prompts, what it came from and
how it trained; typed, versioned, read and checked once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ModelConfig
from .errors import InstructuneError
from .io import read_json, write_json
from .prompts import PromptFormat, TaskTemplate

MANIFEST = "instructune.json"
# The layout written today. Files written before the `version` key existed have this same layout: they read as 1.
# A change that an older instructune would misread raises it; a file from a newer instructune is refused.
VERSION = 1
_KINDS = {"dict_type": "a JSON object", "bool_type": "true or false", "string_type": "a string",
          "int_type": "a whole number", "float_type": "a number"}


class Manifest(BaseModel):
    """What `tasks.manifest` writes and every user of a fine-tuned model reads (evaluate, predict, chat, generate,
    export, report). Keys this version does not know are kept (`extra="allow"`), so nothing is lost on a rewrite."""

    model_config = ConfigDict(extra="allow", strict=True)

    version: int = Field(1, ge=1)  # absent: written before the key existed
    base_model: str | None = None  # the local folder the model was trained from (an adapter's base weights)
    base_model_hub_id: str | None = None
    method: str | None = None  # lora or full
    chat_template: bool  # prompts went through the tokenizer's chat template
    encoder_decoder: bool = False
    tasks: dict[str, dict[str, Any]]  # trained task -> its saved template (`TaskTemplate.to_dict`)
    held_out_tasks: dict[str, dict[str, Any]] = {}  # forgetting tasks: evaluated, never trained
    data_fingerprint: str | None = None
    config: dict[str, Any]  # the experiment config, as JSON; `config.model` is checked as a ModelConfig
    versions: dict[str, str] | None = None  # package versions
    audit: dict[str, Any] | None = None  # the masking audit of the training set
    final_loss: float | None = None
    train_id: str | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    memory: dict[str, Any] | None = None  # the memory plan and what each training process held

    @classmethod
    def read(cls, model_dir) -> Manifest:
        """The manifest of a fine-tuned model folder, checked; what is wrong is named with the file and key."""
        path = Path(model_dir) / MANIFEST
        if not path.is_file():
            raise InstructuneError(f"no {MANIFEST} here: expected a model/ folder written by `instructune train`",
                                   str(model_dir))
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise InstructuneError(f"expected a JSON object, not {type(raw).__name__}: rerun `instructune train`",
                                   str(path))
        version = raw.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
            raise InstructuneError(f"manifest version {version} was written by a newer instructune; this one reads "
                                   f"versions up to {VERSION}: upgrade instructune to use this model",
                                   f"{path}: version")
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as e:
            raise _named(e, path) from None
        manifest._check(path)
        return manifest

    def write(self, folder: Path) -> None:
        write_json(Path(folder) / MANIFEST, self.to_dict())

    def to_dict(self) -> dict:
        """The file's content: the version first, then every key given (none added as null), unknown keys last."""
        return {"version": self.version, **self.model_dump(exclude_unset=True, exclude={"version"})}

    def _check(self, path: Path) -> None:
        """What the types do not say: there are tasks, each template reads back, `config.model` is a model config."""
        if not self.tasks:
            raise InstructuneError("no tasks: the model has no saved templates to render prompts with", f"{path}: tasks")
        for key, saved in (("tasks", self.tasks), ("held_out_tasks", self.held_out_tasks)):
            for name, d in saved.items():
                try:
                    TaskTemplate.from_dict(d)
                except (TypeError, KeyError, ValueError) as e:
                    raise InstructuneError(f"the saved template cannot be read ({e}): rerun `instructune train`",
                                           f"{path}: {key}.{name}") from None
        model = self.config.get("model")
        if not isinstance(model, dict):
            raise InstructuneError("the key 'model' is missing or not a JSON object", f"{path}: config.model")
        try:
            ModelConfig(**model)
        except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
            errors = e.errors() if isinstance(e, ValidationError) else []
            loc = ".".join(map(str, errors[0]["loc"])) if errors and errors[0].get("loc") else ""
            msg = errors[0]["msg"] if errors else (str(e).strip().splitlines() or [""])[0][:300]
            raise InstructuneError(msg, f"{path}: config.model" + (f".{loc}" if loc else "")) from None

    # -- what the users of the model read -------------------------------------------------------------------------
    def model_cfg(self) -> ModelConfig:
        """How the model was loaded for training (`config.model`), to load it back the same way."""
        return ModelConfig(**self.config["model"])

    def task_names(self) -> list[str]:
        """The trained tasks, in the order they were configured."""
        return list(self.tasks)

    def templates(self, held_out: bool = False) -> dict[str, TaskTemplate]:
        """The trained tasks' saved templates (and, with `held_out`, the forgetting tasks' after them)."""
        saved = {**self.tasks, **{n: d for n, d in self.held_out_tasks.items() if n not in self.tasks}} \
            if held_out else self.tasks
        return {name: TaskTemplate.from_dict(d) for name, d in saved.items()}

    def task_template(self, task: str | None = None) -> TaskTemplate:
        """The saved template of trained task `task` (or of the model's only task), as the model was trained with it."""
        if task is None:
            if len(self.tasks) > 1:
                raise InstructuneError(f"this model learned several tasks; choose one with --task: {sorted(self.tasks)}",
                                       "--task")
            task = next(iter(self.tasks))
        if task not in self.tasks:
            raise InstructuneError(f"unknown task {task!r}; this model learned {sorted(self.tasks)}", "--task")
        return TaskTemplate.from_dict(self.tasks[task])

    def prompt_format(self, tokenizer, separator: str = "\n") -> PromptFormat:
        """The prompt format training used: the chat template or the plain one (with a task template's `separator`),
        for a decoder-only or an encoder-decoder model, cutting long prompts as training did (`train.max_length`)."""
        max_length = (self.config.get("train") or {}).get("max_length")
        return PromptFormat(tokenizer, self.chat_template, separator, self.encoder_decoder,
                            max_length if isinstance(max_length, int) and not isinstance(max_length, bool) else None)


def _named(e: ValidationError, path: Path) -> InstructuneError:
    """The first thing wrong in the file, in words, with the file and the key."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(map(str, err["loc"]))
    where = f"{path}: {loc}" if loc else str(path)
    if err["type"] == "missing":
        return InstructuneError(f"the key {err['loc'][-1]!r} is missing: the file is incomplete or was not written by "
                                "`instructune train`; rerun it", where)
    if err["type"] in _KINDS:
        return InstructuneError(f"{loc!r} should be {_KINDS[err['type']]}, not {type(err['input']).__name__}", where)
    return InstructuneError(err["msg"], where)
