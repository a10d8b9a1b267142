"""The experiment config: one typed object, loaded from YAML, with `key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InstructuneError

TaskType = Literal["classification", "summarization", "translation", "qa", "ner"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Where a task's records come from: one source split for you, or your own splits."""

    path: str | None = Field(None, description="JSONL/CSV/Parquet file, datasets folder or hub id; split by seed")
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    hub_split: str = Field("train", description="which split of a hub/datasets source to read when `path` is one")
    validation_size: float = Field(0.1, ge=0, lt=1)
    test_size: float = Field(0.2, gt=0, lt=1)
    max_train: int | None = Field(None, gt=0, description="cap on training records (after splitting)")
    max_validation: int | None = Field(None, gt=0)
    max_test: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is None and self.train is None:
            raise ValueError("give `path` (split for you) or `train` (+ `validation`, `test`)")
        if self.path is not None and self.train is not None:
            raise ValueError("give either `path` or `train`/`validation`/`test`, not both")
        if self.train is not None and self.test is None:
            raise ValueError("with `train` given, also give `test` (the split everything is measured on)")
        return self


class TemplateConfig(Strict):
    """A user template: Jinja, rendered in a sandbox over the record's fields."""

    prompt: str
    completion: str
    separator: str = "\n"


class TaskConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: TaskType
    data: DataConfig
    template: str | TemplateConfig | None = Field(None, description="library name (see `instructune templates`) or {prompt, completion}")
    fields: dict[str, str] = Field(default_factory=dict, description="template variable -> record field")
    variables: dict[str, Any] = Field(default_factory=dict, description="constants for the template, e.g. target_lang")
    choices: list[str] | None = Field(None, description="classification answer choices; default: the training labels")
    max_new_tokens: int | None = Field(None, gt=0)
    system_prompt: str | None = None


class ModelConfig(Strict):
    name: str = Field("smollm2-135m", description="preset, hub id, local folder or .gguf file")
    gguf_file: str | None = None
    chat_template: Literal["auto", "on", "off"] = "auto"
    trust_remote_code: bool = False
    revision: str | None = None


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="0 by default (as torchtune): on a CPU, dropout on the 7 adapted inputs of every layer costs about 1.6x the time and 25 % more memory")
    target_modules: str | list[str] = "all-linear"


class TrainConfig(Strict):
    method: Literal["lora", "full"] = "lora"
    epochs: float = Field(2, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    packing: bool = Field(False, description="concatenate each micro-batch into one row with no padding (examples "
                                             "never attend to each other); off: left-padded rows grouped by length")
    share_prefix: int = Field(16, ge=0, description="when all examples of a micro-batch begin with at least this many "
                              "identical tokens (system prompt, instruction), compute them once per micro-batch; 0: off")
    pass_tokens: int = Field(1024, ge=0, description="split a micro-batch whose padded rows hold more tokens than this "
                             "into several forward/backward passes: the same update with less activation memory "
                             "(long examples); 0: never split")
    lr: float | None = Field(None, gt=0, description="default 1e-3 for LoRA, 5e-5 for full")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = 1.0
    max_length: int = Field(512, gt=8)
    eval_every: int | None = Field(None, gt=0, description="steps between validation passes; default once per epoch")
    max_validation: int = Field(64, gt=0, description="validation examples scored for loss during training")
    bf16: bool = Field(False, description="bfloat16 autocast (CPU with AVX512-BF16/AMX, or CUDA)")
    save_every: int = Field(0, ge=0, description="steps between checkpoints for `--resume` (0: none)")
    eval_metric: bool = Field(False, description="at each validation also score each task's own metric by generation "
                                                 "on a fixed validation subsample (`metric_samples` per task)")
    metric_samples: int = Field(16, gt=0, description="validation examples per task scored by generation")
    early_stopping_patience: int | None = Field(None, gt=0, description="stop after this many validations without "
                                                "improvement (of the metric with eval_metric, else of the loss)")
    keep_best: bool = Field(False, description="end with the weights of the best validation, not the last step")
    tensorboard: bool = Field(False, description="also log to runs/<name>/tensorboard (needs the tensorboard package)")
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.method == "lora" else 5e-5)


class BaselineConfig(Strict):
    enabled: bool = True
    k: int = Field(3, ge=2, description="shots in the k-shot baseline (besides 0 and 1)")

    @property
    def shots(self) -> list[int]:
        return [0, 1, self.k] if self.enabled else []


class EvalConfig(Strict):
    batch_size: int = Field(32, gt=0)
    bf16: bool = Field(False, description="bfloat16 autocast for generation (faster prefill; greedy outputs may differ slightly)")
    max_new_tokens: int = Field(64, gt=0, description="default per task type is smaller; a task may override")
    samples: int = Field(3, ge=0, description="sample outputs per task in the report")
    classification_mode: Literal["generation", "likelihood"] = Field(
        "generation", description="generation: greedy answer parsed to a choice; likelihood: the choice with the "
                                  "highest log-probability (rank classification; one batched pass, never invalid)")
    bootstrap_resamples: int = Field(2000, ge=0, description="paired bootstrap resamples for each CI; 0 turns CIs off")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")
    leakage_threshold: float = Field(0.8, gt=0, le=1, description="share of a test input's word 3-grams found in one "
                                                                  "training input that makes it a near duplicate")


class ExperimentConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str | None = Field(None, description="default runs/<name>")
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = Field(min_length=1)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    forgetting: list[TaskConfig] = Field(default_factory=list, description="held-out tasks never trained on, "
                                         "scored zero-shot before and after fine-tuning: what fine-tuning broke")

    @model_validator(mode="after")
    def _unique_tasks(self):
        names = [t.name for t in self.tasks + self.forgetting]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return self

    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise InstructuneError(f"no task named {name!r}; tasks are {[t.name for t in self.tasks]}", "--task")


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read YAML, apply `key=value` overrides (dotted keys, list items by index), validate.

    Relative data paths in the file are taken relative to the config file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InstructuneError("config file not found", str(path))
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InstructuneError(f"not valid YAML: {getattr(e, 'problem', e)}", where) from None
    if not isinstance(raw, dict):
        raise InstructuneError("expected a mapping of config keys at the top level", str(path))
    for item in overrides:
        _apply_override(raw, item)
    _resolve_data_paths(raw, path.parent)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        keys = [str(k) for k in err["loc"]]
        line = _line_of(root, err["loc"])
        where = f"{path}:{line} ({'.'.join(keys)})" if line else f"{path} ({'.'.join(keys)})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown config key {keys[-1]!r}"
        elif "input" in err and err["type"] != "missing":
            msg = f"{msg} (got {err['input']!r})"
        more = f" [and {len(e.errors()) - 1} more problem(s)]" if len(e.errors()) > 1 else ""
        raise InstructuneError(msg + more, where) from None


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise InstructuneError(f"expected key=value, got {item!r}", "--set")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise InstructuneError(f"no list item {part!r} in {'.'.join(parts[:i])}", f"--set {key}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() else {})
    last = parts[-1]
    parsed = yaml.safe_load(value) if value.strip() else ""
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise InstructuneError(f"no list item {last!r}", f"--set {key}")
        node[int(last)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise InstructuneError(f"{'.'.join(parts[:-1])} is not a mapping", f"--set {key}")


def _resolve_data_paths(raw: dict, base: Path) -> None:
    """Relative data paths are relative to the config file; `owner/name` that is no local path stays a hub id."""
    for task in [*(raw.get("tasks") or []), *(raw.get("forgetting") or [])]:
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            continue
        for key in ("path", "train", "validation", "test"):
            value = data.get(key)
            if not isinstance(value, str) or Path(value).expanduser().is_absolute():
                continue
            local = base / value
            hub_like = value.count("/") == 1 and not value.startswith(".") and not Path(value).suffix
            if local.exists() or not hub_like:
                data[key] = str(local.resolve())


def _line_of(node, loc) -> int | None:
    """The YAML line of a key path, for error messages (None for keys given only by overrides)."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                break
            k, node = match[0]
            line = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line
