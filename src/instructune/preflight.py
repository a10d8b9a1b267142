"""What the config and the data alone decide, checked by `tasks.prepare` (so by `data lint` and by every command
before a run folder is created or a model is loaded): refusals for what cannot run (a model's own code, a launch
the config clashes with, best-prompt names and splits, a max_length past the model's context), and warnings for
what is legal but likely wrong (FSDP in one process, prompts cut into their instruction, the answer in the prompt).

Under a launcher every process runs the same checks on the same inputs: each refuses with one line and exit 2
before any process group exists; warnings come from process 0 only."""

from __future__ import annotations

import os

from jinja2 import Environment, TemplateError, meta

from . import tasktypes
from .config import ExperimentConfig, ModelConfig, fsdp_clash
from .data import Record
from .errors import InstructuneError
from .evaluate.best_prompt import candidates
from .models import hf_config
from .prompts.format import prompt_room
from .runtime import check_launcher, is_main_process, warn


def check(cfg: ExperimentConfig, source: str, tasks: list) -> None:
    """Refuse what cannot run, then say what is likely wrong (see the module's docstring). `tasks`: the prepared
    `tasks.Task`s (trained ones and held-out ones)."""
    model_code(source, cfg.model)
    launch(cfg)
    model_context(source, cfg)
    for i, task in enumerate(t for t in tasks if not t.held_out):
        best_prompt_supply(task, cfg, i)
    if not is_main_process():
        return
    for message in likely_wrong(cfg, tasks):
        warn(message)


def model_code(source: str, model: ModelConfig) -> None:
    """A model whose code is not part of transformers runs only with `model.trust_remote_code: true`: refused here,
    not when its weights are first loaded (after the run folder exists and the baselines ran)."""
    if model.trust_remote_code:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source, trust_remote_code=False, revision=model.revision)
    except ValueError as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise InstructuneError(f"{source} needs code that comes with the model, not part of transformers; "
                                   "instructune runs no such code unless you set model.trust_remote_code: true "
                                   "(only for code you have read and trust)", "model.trust_remote_code") from None
    except OSError:
        pass  # no config to read: loading the model says what is missing


def processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launch(cfg: ExperimentConfig) -> None:
    """`train.strategy: fsdp` (or an FSDP launch config) with what the sharded path cannot train."""
    train = cfg.train
    sharded = train.strategy == "fsdp" or (check_launcher() == "fsdp" and processes() > 1)
    if not sharded:
        return
    if clash := fsdp_clash(train):
        raise InstructuneError(clash, "train.strategy")
    if train.eval_metric:  # generation stops on each process's own outputs: a differing count of collectives hangs
        raise InstructuneError("train.eval_metric (scoring by generation during training) is not supported with "
                               "strategy fsdp yet; use the validation loss (eval_metric: false) or strategy: ddp",
                               "train.eval_metric")


def model_context(source: str, cfg: ExperimentConfig) -> None:
    """`train.max_length` at most the positions the model was built for (when its config says)."""
    try:
        config = hf_config(source, cfg.model)
    except InstructuneError:
        return
    config = getattr(config, "text_config", config)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and positions > 0 and cfg.train.max_length > positions and \
            not getattr(config, "is_encoder_decoder", False):
        raise InstructuneError(f"{cfg.train.max_length} is longer than the {positions} positions this model was "
                               f"built for; use at most {positions}", "train.max_length")


def best_prompt_supply(task, cfg: ExperimentConfig, index: int) -> None:
    """`baseline.templates`: every name a library template of the task's type, and a validation split to choose on."""
    if not cfg.baseline.enabled or cfg.baseline.templates == "one":
        return
    if candidates(task.template, cfg.baseline.templates, "baseline.templates") and not task.pairs.get("validation"):
        raise InstructuneError(f"the best-prompt baseline chooses on the validation split, and task {task.name!r} has "
                               f"none: give tasks.{index}.data.validation (or a validation_size above 0), or "
                               "baseline.templates: one", "baseline.templates")


def likely_wrong(cfg: ExperimentConfig, tasks: list) -> list[str]:
    """Legal input that is likely a mistake, one sentence each."""
    out = []
    if cfg.train.strategy == "fsdp" and processes() <= 1 and check_launcher() != "fsdp":
        out.append("train.strategy: fsdp with one process trains the model unsharded (FSDP shards across processes): "
                   "launch several, e.g. `torchrun --nproc_per_node 2 -m instructune.cli train CONFIG`")
    for task in tasks:
        if task.held_out or task.template.template is None:
            continue
        kind = tasktypes.get(task.template.type)
        if kind.answer in template_variables(task.template.template.prompt):
            out.append(f"task {task.name!r}: the template's prompt reads {{{{ {kind.answer} }}}}, the answer the model "
                       "is trained to write: it learns to copy it, and inference has no answer to show")
        room = prompt_room(cfg.train.max_length, task.template.max_new_tokens, task.fmt.seq2seq)
        instruction = instruction_tokens(task)
        if instruction is not None and room < instruction:
            out.append(f"task {task.name!r}: train.max_length {cfg.train.max_length} leaves {room} prompt token(s) "
                       f"after the answer's {task.template.max_new_tokens}, fewer than the template's own text "
                       f"({instruction} tokens without any record): every prompt is cut into its instruction")
    return out


def template_variables(source: str) -> set[str]:
    try:
        return set(meta.find_undeclared_variables(Environment().parse(source)))
    except TemplateError:
        return set()


def instruction_tokens(task) -> int | None:
    """Tokens of the task's prompt for a record whose fields are one letter each: the template's own text (None
    when the template cannot render so)."""
    template = task.template
    kind = tasktypes.get(template.type)
    fields = {template.fields.get(f, f): "x" for f in (*kind.inputs, kind.answer)}  # (an empty field is refused)
    try:
        messages = template.prompt_only(Record(fields, "(the template without a record)"))
    except InstructuneError:
        return None
    return len(task.fmt.encode_prompt(task.fmt.prompt_text(messages)))
