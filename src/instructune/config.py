"""The experiment config: one typed object, loaded from YAML, with `key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from . import tasktypes
from .errors import InstructuneError
from .hub import looks_like_hub_id

# A config is a few hundred nodes; these caps refuse an alias bomb or a deep nest before anything is expanded.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64
# Upper bounds of the numeric settings: far past any sensible value, so they refuse only a typo or a wrong unit
# (the README's table of domains lists every one; tests/hostile/test_domains.py checks each is bounded both ways).
MAX_TOKENS = 2**20  # a token count (no model reads a million tokens; the model's own context is checked on load)
MAX_RECORDS = 10**9
MAX_STEPS = 10**9
MAX_BATCH = 65_536
LR_MAX = 1000.0  # AdamW moves every weight by about lr per step: 1000 already diverges in a few steps


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
    max_train: int | None = Field(None, gt=0, le=MAX_RECORDS, description="cap on training records (after splitting)")
    max_validation: int | None = Field(None, gt=0, le=MAX_RECORDS)
    max_test: int | None = Field(None, gt=0, le=MAX_RECORDS)

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


def _check_name(name: str) -> str:
    """A name becomes a folder or file name: `.` and `..` would point at another folder."""
    if name in (".", ".."):
        raise ValueError(f"{name!r} is not a usable name (it names a folder that exists already)")
    return name


class TaskConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: str = Field(description="a registered task type (instructune/tasktypes.py): classification, "
                      "summarization, translation, qa, ner")
    data: DataConfig
    template: str | TemplateConfig | None = Field(None, description="library name (see `instructune templates`) or {prompt, completion}")
    fields: dict[str, str] = Field(default_factory=dict, description="template variable -> record field")
    variables: dict[str, Any] = Field(default_factory=dict, description="constants for the template, e.g. target_lang")
    choices: list[str] | None = Field(None, description="classification answer choices; default: the training labels")
    max_new_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS)
    system_prompt: str | None = None

    _name = field_validator("name")(_check_name)

    @field_validator("type")
    @classmethod
    def _registered_type(cls, v):
        tasktypes.get(v)  # an unknown type is a ValueError listing the known ones, reported with the key and line
        return v

    @field_validator("choices", mode="before")
    @classmethod
    def _clean_choices(cls, v):
        """Choices are labels: integers (stars 1..5) are taken as their digits, whitespace around a label is dropped,
        and an empty or repeated choice is refused."""
        if not isinstance(v, list):
            return v
        out = []
        for c in v:
            if isinstance(c, int) and not isinstance(c, bool):
                c = str(c)
            if not isinstance(c, str):
                raise ValueError(f"a choice must be a string or an integer, got {c!r}")
            if not c.strip():
                raise ValueError("a choice is empty")
            if c.strip() in out:
                raise ValueError(f"the choice {c.strip()!r} is given twice")
            out.append(c.strip())
        return out


class ModelConfig(Strict):
    name: str = Field("smollm2-135m", description="preset, hub id, local folder or .gguf file")
    gguf_file: str | None = None
    chat_template: Literal["auto", "on", "off"] = "auto"
    trust_remote_code: bool = False
    revision: str | None = None


class LoraConfig(Strict):
    r: int = Field(16, gt=0, le=4096)
    alpha: int = Field(32, gt=0, le=65_536)
    dropout: float = Field(0.0, ge=0, lt=1, description="0 by default (as torchtune): on a CPU, dropout on the 7 adapted inputs of every layer costs about 1.6x the time and 25 % more memory")
    target_modules: str | list[str] = Field("all-linear", description="`all-linear` (every linear layer but the "
                                            "output head) or a list of module names (e.g. [q_proj, v_proj])")
    variant: Literal["lora", "dora", "rslora"] = Field(
        "lora", description="lora; dora (weight-decomposed: a trained magnitude per output, then a LoRA update of the "
        "direction); rslora (rank-stabilised: scaling alpha/sqrt(r) instead of alpha/r, for large ranks)")
    init: Literal["default", "pissa", "olora"] = Field(
        "default", description="default (A random, B zero: training starts at the base model); pissa (A, B from the "
        "weight's principal singular vectors, the rest left in the base); olora (from a QR decomposition). The saved "
        "adapter is converted to a plain LoRA on the original base (rank 2r)")
    modules_to_save: list[str] | None = Field(None, description="modules trained whole and saved with the adapter "
                                              "(e.g. [lm_head] for new tokens)")

    @model_validator(mode="after")
    def _convertible(self):
        """PiSSA/OLoRA are saved as a plain LoRA (A and B of rank 2r): peft's conversion keeps only A and B."""
        if self.init != "default" and (self.variant == "dora" or self.modules_to_save):
            raise ValueError(f"init: {self.init} cannot be combined with "
                             f"{'variant: dora' if self.variant == 'dora' else 'modules_to_save'}: its adapter is saved "
                             "converted to a plain LoRA on the original base, which keeps only the A and B matrices")
        return self


class TrainConfig(Strict):
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora: adapters on the frozen base; qlora: the same on a base loaded in 4 bits "
        "(bitsandbytes, `pip install 'instructune[qlora]'`); full: every weight trained")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: the 4-bit data type of the base weights")
    double_quant: bool = Field(True, description="qlora: quantize the per-block scales too (8 bits instead of 32: "
                               "about 0.37 bits less per weight)")
    gradient_checkpointing: bool = Field(False, description="keep only each decoder layer's input for backward and "
                                         "recompute the layer there: much less activation memory for about a third "
                                         "more compute (the same losses and gradients)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="with several processes: ddp keeps a whole model, its "
                                             "gradients and optimizer state in every process; fsdp shards them "
                                             "across processes (PyTorch FSDP2), for models past one device's memory")
    epochs: float | Literal["auto"] = Field(2.0, description="passes over the training split (a fraction: part of one; "
                                            "at most 1000); auto: from the number of training examples and the "
                                            "method (README, `train.epochs: auto`)")
    batch_size: int = Field(8, gt=0, le=MAX_BATCH)
    grad_accum: int = Field(1, gt=0, le=MAX_BATCH)
    packing: bool = Field(False, description="concatenate each micro-batch into one row with no padding (examples "
                                             "never attend to each other); off: left-padded rows grouped by length")
    share_prefix: int = Field(16, ge=0, le=MAX_TOKENS, description="when all examples of a micro-batch begin with at least this many "
                              "identical tokens (system prompt, instruction), compute them once per micro-batch; 0: off")
    pass_tokens: int = Field(1024, ge=0, le=2**24, description="split a micro-batch whose padded rows hold more tokens than this "
                             "into several forward/backward passes: the same update with less activation memory "
                             "(long examples); 0: never split")
    lr: float | Literal["auto"] | None = Field(None, description="default 1e-3 for LoRA and QLoRA, 5e-5 for full; "
                                               "auto: from the method and the supervised tokens per step (README)")
    optimizer: Literal["adamw"] = Field("adamw", description="adamw: AdamW (fused kernel on CPU and CUDA), with "
                                        "weight_decay")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="the learning rate after a linear warm-up over warmup_ratio of the steps: linear "
        "decay to zero at the last step, cosine decay to zero, or constant")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, description="clip the gradient norm to this (null: no "
                                        "clipping); 0 or less would zero or flip every update")
    max_length: int = Field(512, gt=8, le=MAX_TOKENS, description="longest training example in tokens (prompts "
                            "are cut from the start past it); at most the model's context")
    eval_every: int | None = Field(None, gt=0, le=MAX_STEPS, description="steps between validation passes; default once per epoch")
    max_validation: int = Field(64, gt=0, le=MAX_RECORDS, description="validation examples scored for loss during training")
    bf16: bool = Field(False, description="bfloat16 autocast (CPU with AVX512-BF16/AMX, or CUDA)")
    save_every: int = Field(0, ge=0, le=MAX_STEPS, description="steps between checkpoints for `--resume` (0: none)")
    eval_metric: bool = Field(False, description="at each validation also score each task's own metric by generation "
                                                 "on a fixed validation subsample (`metric_samples` per task)")
    metric_samples: int = Field(16, gt=0, le=MAX_RECORDS, description="validation examples per task scored by generation")
    early_stopping_patience: int | None = Field(None, gt=0, le=MAX_STEPS, description="stop after this many validations without "
                                                "improvement (of the metric with eval_metric, else of the loss)")
    keep_best: bool = Field(False, description="end with the weights of the best validation, not the last step")
    tensorboard: bool = Field(False, description="also log to runs/<name>/tensorboard (needs the tensorboard package)")
    lora: LoraConfig = Field(default_factory=LoraConfig)

    _auto: dict = PrivateAttr(default_factory=dict)  # what `auto` came to for this data (train/auto.py, `resolve`)

    @field_validator("epochs", "lr", mode="before")
    @classmethod
    def _number_or_auto(cls, v, info):
        """A positive number within bounds, or `auto` (one message naming the key, not one per union member)."""
        if v is None and info.field_name == "lr" or v == "auto":
            return v
        top = 1000 if info.field_name == "epochs" else LR_MAX
        try:
            number = float(v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else None
        except ValueError:
            number = None
        if number is None or not 0 < number <= top:
            raise ValueError(f"expected a number above 0 and at most {top:g}, or auto")
        return number

    def set_auto(self, **values: float) -> None:
        """What `epochs: auto` / `lr: auto` came to (from the data, `train/auto.py`); the config keeps saying auto."""
        self._auto.update(values)

    def _resolved(self, key: str) -> float:
        if key not in self._auto:
            raise InstructuneError(f"train.{key}: auto is decided from the training data; prepare the tasks first "
                                   "(tasks.prepare)", f"train.{key}")
        return self._auto[key]

    @property
    def learning_rate(self) -> float:
        if self.lr == "auto":
            return self._resolved("lr")
        return self.lr if self.lr is not None else (5e-5 if self.method == "full" else 1e-3)

    @property
    def epoch_count(self) -> float:
        """The passes over the training split: `epochs`, or what `auto` came to."""
        return self._resolved("epochs") if self.epochs == "auto" else self.epochs

    @model_validator(mode="after")
    def _quantizable(self):
        """QLoRA's 4-bit base cannot be decomposed into PiSSA/OLoRA factors as trained here: the SVD/QR needs the
        full-precision weight, and the quantized residual would differ from the base the adapter is saved for."""
        if self.method == "qlora" and self.lora.init != "default":
            raise ValueError(f"lora.init: {self.lora.init} is not supported with method: qlora (its decomposition "
                             "needs the full-precision base weights); use init: default, or method: lora")
        if self.strategy == "fsdp" and (clash := fsdp_clash(self)):
            raise ValueError(clash)
        return self


def fsdp_clash(train: TrainConfig) -> str | None:
    """What the sharded path (FSDP2) cannot train, in words; None when it can. Checked with the config, and again
    when an `accelerate launch` FSDP config asks for sharding without `train.strategy` saying so."""
    if train.method == "qlora":
        return ("method: qlora is not supported with strategy: fsdp yet (FSDP2 cannot shard 4-bit weights and their "
                "quantization state); use strategy: ddp, or method: lora")
    if train.lora.init != "default" and train.method != "full":
        return (f"lora.init: {train.lora.init} is not supported with strategy: fsdp yet (the gathered adapter would "
                "lose its conversion to a plain LoRA); use init: default, or strategy: ddp")
    return None


class BaselineConfig(Strict):
    enabled: bool = True
    k: int = Field(3, ge=2, le=64, description="shots in the k-shot baseline (besides 0 and 1)")
    classical: bool = Field(True, description="also score a classical method fitted on the training split (TF-IDF + "
                            "logistic regression, lead-N, copy the source, best-overlap sentence, entity dictionary)")
    templates: Literal["one", "all"] | list[str] = Field(
        "one", description="`all` (or a list of library template names): also score the base model under every "
        "phrasing × 0/1/k shots on the validation split and report the best one on the test split (base_best_prompt)")

    @property
    def shots(self) -> list[int]:
        return [0, 1, self.k] if self.enabled else []


class EvalConfig(Strict):
    batch_size: int = Field(32, gt=0, le=MAX_BATCH)
    bf16: bool = Field(False, description="bfloat16 autocast for generation (faster prefill; greedy outputs may differ slightly)")
    max_new_tokens: int = Field(64, gt=0, le=MAX_TOKENS, description="default per task type is smaller; a task may override")
    samples: int = Field(3, ge=0, le=10_000, description="sample outputs per task in the report")
    classification_mode: Literal["generation", "likelihood"] = Field(
        "generation", description="generation: greedy answer parsed to a choice; likelihood: the choice with the "
                                  "highest log-probability (rank classification; one batched pass, never invalid)")
    bootstrap_resamples: int = Field(2000, ge=0, le=10**6, description="paired bootstrap resamples for each CI; 0 turns CIs off")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")
    leakage_threshold: float = Field(0.8, gt=0, le=1, description="share of a test input's word 3-grams found in one "
                                                                  "training input that makes it a near duplicate")


class LimitsConfig(Strict):
    """Bounds on the work one record may cost: a template that goes past them is refused, naming the record."""

    max_render_chars: int = Field(1_000_000, gt=0, le=10**9, description="longest text one template render may produce")
    max_render_seconds: float = Field(2.0, gt=0, le=3600, description="longest time one template render may take")


MAX_BUDGET_SECONDS = 30 * 24 * 3600


def parse_duration(text) -> float:
    """Seconds of a wall-clock budget written `45m`, `1h30m`, `90s` or a plain number of seconds (ValueError else)."""
    import re

    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
    if isinstance(text, bool) or not match or not any(match.groups()):
        raise ValueError(f"expected a duration such as 45m, 1h30m or 90s, got {text!r}")
    h, m, sec = (float(g or 0) for g in match.groups())
    seconds = 3600 * h + 60 * m + sec
    if not 1 <= seconds <= MAX_BUDGET_SECONDS:
        raise ValueError(f"a budget of {text!r} is outside 1 second .. 30 days")
    return seconds


class SearchRange(Strict):
    """One searched setting: a range (`low`, `high`; `log` draws log-uniformly, `step` on a grid) or `choices`
    (`all` for a task's template: every library phrasing of its type)."""

    low: float | None = Field(None, ge=-1e9, le=1e9)
    high: float | None = Field(None, ge=-1e9, le=1e9)
    log: bool = False
    step: float | None = Field(None, gt=0, le=1e9)
    choices: Literal["all"] | list[str | int | float] | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high (a range) or choices (a list)")
        if self.choices is None and not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and (self.choices is not None or self.low <= 0 or self.step is not None):
            raise ValueError("log needs a range above 0 and no step")
        if isinstance(self.choices, list) and len(set(map(str, self.choices))) != len(self.choices):
            raise ValueError("a choice is given twice")
        return self

    def values(self) -> list:
        """The values a trial can get at the edges (a range) or all of them (choices): checked against the config."""
        return [self.low, self.high] if self.choices is None else ([] if self.choices == "all" else self.choices)


class MlflowConfig(Strict):
    """Where MLflow tracking logs (`instructune.tracking`); nothing leaves the machine unless `uri` names a server."""

    uri: str | None = Field(None, min_length=1, max_length=4096,
                            description="the tracking URI: sqlite:///PATH/mlflow.db (a local store), http(s)://... (a "
                                        "server), databricks; default sqlite:///mlruns/mlflow.db in the working "
                                        "directory, artifacts beside it")
    experiment: str | None = Field(None, min_length=1, max_length=500, description="the MLflow experiment; default "
                                                                                   "the config's name")

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v):
        import re

        if v is not None and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", v):
            raise ValueError(f"{v!r} is not a URI: sqlite:///PATH/mlflow.db for a local store, http://HOST:PORT for a "
                             "server (MLflow no longer writes plain folders)")
        return v


class TrackingConfig(Strict):
    mlflow: MlflowConfig | None = Field(None, description="log params, per-step and final metrics, and the report to "
                                                          "MLflow (`mlflow: {}`: a local store); pip install "
                                                          "'instructune[mlflow]'")


class SweepConfig(Strict):
    """`instructune sweep`: the settings searched (Optuna, TPE) on the validation split, and the search's limits."""

    trials: int = Field(20, ge=1, le=10_000, description="trials to run (the first: the config's own settings)")
    budget: str | None = Field(None, description="wall-clock limit of the search, e.g. 45m or 2h (none: --trials only)")
    evaluations: int = Field(3, ge=1, le=100, description="validations per trial: the values the median pruner compares")
    metric_samples: int = Field(64, gt=0, le=MAX_RECORDS, description="validation examples per task scored by "
                                "generation at each evaluation")
    task: str | None = Field(None, description="optimise this task's primary metric; default: the mean over the tasks")
    startup_trials: int = Field(2, ge=0, le=10_000, description="finished trials before the median pruner stops any")
    space: dict[str, SearchRange] | None = Field(None, max_length=32, description="dotted key (train.lr, "
                                                 "tasks.0.template, model.name, ...) -> range or choices; default: "
                                                 "train.lr, train.epochs and, for LoRA, train.lora.r and alpha")

    @field_validator("budget")
    @classmethod
    def _duration(cls, v):
        if v is not None:
            parse_duration(v)
        return v

    @property
    def budget_seconds(self) -> float | None:
        return None if self.budget is None else parse_duration(self.budget)


class ExperimentConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str | None = Field(None, description="default runs/<name>")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = Field(min_length=1)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    forgetting: list[TaskConfig] = Field(default_factory=list, description="held-out tasks never trained on, "
                                         "scored zero-shot before and after fine-tuning: what fine-tuning broke")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="`instructune sweep`: the search space")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="experiment tracking (MLflow)")

    _name = field_validator("name")(_check_name)

    @field_validator("sweep")
    @classmethod
    def _searchable(cls, v: SweepConfig, info):
        """Every searched key names a setting, and each value it can take (range edges, choices) is a valid config."""
        if not {"tasks", "train", "model"} <= set(info.data):
            return v  # an earlier key failed: that error is the one reported
        names = [t.name for t in info.data["tasks"]]
        if v.task is not None and v.task not in names:
            raise ValueError(f"task: no task named {v.task!r}; tasks are {names}")
        base = {k: _plain(x) for k, x in info.data.items()}
        for key, space in (v.space or {}).items():
            if space.choices == "all" and not (key.startswith("tasks.") and key.endswith(".template")):
                raise ValueError(f"space.{key}: choices: all is for a task's template (tasks.N.template)")
            for value in space.values() or [_get(base, key, f"space.{key}")]:
                try:
                    with_values(base, {key: value})
                except InstructuneError as e:
                    raise ValueError(f"space.{key}: {value!r} is not a valid value here ({e})") from None
        return v

    @field_validator("output_dir")
    @classmethod
    def _safe_output_dir(cls, v):
        """Never a file, the root, the home folder, the working directory or a folder holding one of them."""
        if v is None:
            return v
        if not v.strip():
            raise ValueError("is empty; leave it out for runs/<name>")
        try:
            path = Path(v).expanduser()
            resolved = path.resolve()
            protected = {Path("/").resolve(): "the root folder", Path.cwd().resolve(): "the working directory"}
            protected[Path.home().resolve()] = "your home folder"
        except (OSError, RuntimeError) as e:  # a symlink loop, no home folder
            raise ValueError(f"{v!r} cannot be resolved ({e})") from None
        if path.exists() and not path.is_dir():
            raise ValueError(f"{v!r} is an existing file, not a folder")
        for folder, what in protected.items():
            if resolved == folder:
                raise ValueError(f"{v!r} is {what}; give the run a folder of its own")
            if resolved in folder.parents:
                raise ValueError(f"{v!r} contains {what}; give the run a folder of its own")
        return v

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


def _plain(value):
    """A validated config part as plain JSON-like data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _get(raw, key: str, where: str):
    """The value at a dotted key of plain config data (`tasks.0.template`); InstructuneError when none is there."""
    node = raw
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise InstructuneError(f"{key!r} names no config setting", where)
    return node


def with_values(cfg: "ExperimentConfig | dict", values: dict[str, Any]) -> ExperimentConfig:
    """The config with dotted keys set (`train.lr`, `tasks.0.template`), validated again: what a sweep's trial runs.
    A key that names no setting, or a value the config refuses, is an InstructuneError naming the key."""
    import copy

    raw = copy.deepcopy(cfg if isinstance(cfg, dict) else cfg.model_dump(mode="json"))
    for key, value in values.items():
        parent, _, last = key.rpartition(".")
        node = _get(raw, parent, key) if parent else raw
        _get(node, last, key)  # the key exists
        node[int(last) if isinstance(node, list) else last] = value
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise InstructuneError(f"{err['msg']} (got {err.get('input')!r})",
                               ".".join(str(k) for k in err["loc"]) or "config") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read YAML, apply `key=value` overrides (dotted keys, list items by index), validate.

    Relative data paths in the file are taken relative to the config file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InstructuneError("config file not found", str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InstructuneError(f"cannot read: {e.strerror or e}", str(path)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InstructuneError(f"not UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start}; save it as UTF-8",
                               f"{path}:{line}") from None
    raw, root = load_yaml(text, str(path))
    raw = {} if raw is None else raw
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
        dotted = f" ({'.'.join(keys)})" if keys else ""
        where = f"{path}:{line}{dotted}" if line else f"{path}{dotted}"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown config key {keys[-1]!r}"
        elif "input" in err and err["type"] != "missing":
            msg = f"{msg} (got {err['input']!r})"
        more = f" [and {len(e.errors()) - 1} more problem(s)]" if len(e.errors()) > 1 else ""
        raise InstructuneError(msg + more, where) from None


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than MAX_YAML_DEPTH while it composes (before Python's own
    recursion limit could be reached)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _TooBig(f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _TooBig(Exception):
    def __init__(self, message: str, mark=None):
        super().__init__(message)
        self.mark = mark


def load_yaml(text: str, where: str) -> tuple[Any, Any]:
    """The data of a YAML text and its node tree, refused (InstructuneError at `where`, with the line) when it is not
    YAML, nests deeper than MAX_YAML_DEPTH or would expand (aliases counted each time they are used) to more than
    MAX_YAML_NODES nodes: checked on the node graph, before anything is expanded."""
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _expanded_size(root, {}, set(), 0)
        return loader.construct_document(root), root
    except _TooBig as e:
        line = f":{e.mark.line + 1}" if e.mark is not None and not where.startswith("--set") else ""
        raise InstructuneError(f"YAML {e} (aliases counted each time they are used); refused", where + line) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark and not where.startswith("--set") else ""
        raise InstructuneError(f"not valid YAML: {getattr(e, 'problem', None) or e}", where + line) from None
    except RecursionError:
        raise InstructuneError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels; refused", where) from None
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict, active: set, depth: int) -> tuple[int, int]:
    """(nodes, height) of `node` once every alias is expanded, computed once per distinct node (so an alias bomb costs
    no more than its text); raises _TooBig past MAX_YAML_NODES, past MAX_YAML_DEPTH after expansion, or on a
    recursive alias."""
    key = id(node)
    if key not in sizes:
        if key in active:
            raise _TooBig("alias refers to a node that contains it (a recursive alias)", node.start_mark)
        active.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        size, height = 1, 1
        for child in children:
            child_size, child_height = _expanded_size(child, sizes, active, depth + 1)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_YAML_NODES:
                raise _TooBig(f"expands to more than {MAX_YAML_NODES:,} nodes", node.start_mark)
        active.discard(key)
        sizes[key] = size, height
    size, height = sizes[key]
    if depth + height > MAX_YAML_DEPTH:
        raise _TooBig(f"nested deeper than {MAX_YAML_DEPTH} levels", node.start_mark)
    return size, height


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
        elif isinstance(node, dict):
            if node.get(part) is None:  # `train:` left empty in the file is an empty mapping
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        else:
            raise InstructuneError(f"{'.'.join(parts[:i])} is a single value, not a mapping", f"--set {key}")
    last = parts[-1]
    parsed = load_yaml(value, f"--set {key}")[0] if value.strip() else ""
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
            if local.exists() or not looks_like_hub_id(value):
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
