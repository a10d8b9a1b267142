"""The prepared experiment: each task's template, records, rendered pairs and prompt format, checked before anything
is written; and what is derived from them (data fingerprint, data statistics, the manifest saved with the model)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from . import preflight, tasktypes
from .config import ExperimentConfig, TaskConfig
from .data import Record, detect_shape, read_sources, split_sources
from .data.leakage import find_leakage
from .errors import InstructuneError
from .manifest import VERSION, Manifest
from .models import (PRESETS, context_length, is_encoder_decoder, load_tokenizer, require_bitsandbytes, resolve_model,
                     use_chat_template, versions)
from .prompts import Encoded, Pair, PromptFormat, TaskTemplate, build_task_template
from .prompts.conversation import turn_report
from .runtime import device, native_bf16, say, warn
from .train.auto import resolve as resolve_auto


@dataclass
class Task:
    """One task, ready: its template, its records and their rendered pairs per split."""

    template: TaskTemplate
    records: dict[str, list[Record]]
    pairs: dict[str, list[Pair]]
    fmt: PromptFormat
    held_out: bool = False  # a forgetting-check task: never trained on, scored zero-shot before and after
    leakage: dict | None = None
    _encoded: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.template.task

    def encoded(self, split: str, max_length: int) -> list[Encoded]:
        """The split's pairs as training tokens (encoded once, however many stages ask)."""
        key = (split, max_length)
        if key not in self._encoded:
            self._encoded[key] = [self.fmt.encode(p, max_length, self.template.max_new_tokens)
                                  for p in self.pairs.get(split, [])]
        return self._encoded[key]


@dataclass
class Prepared:
    cfg: ExperimentConfig
    model_source: str
    tokenizer: object
    chat: bool
    context_length: int
    tasks: list[Task]
    held_out: list[Task]
    seq2seq: bool = False


def prepare(cfg: ExperimentConfig, weights: bool = True) -> Prepared:
    """Load and check everything that could be bad input (model, data, templates, k-shot supply); writes nothing.
    `weights=False` (`instructune plan`): a local model folder needs only its config and tokenizer."""
    if cfg.train.method == "qlora" and weights:
        require_bitsandbytes()  # before anything is loaded or run, not at the training stage
    source = resolve_model(cfg.model, weights=weights)
    tokenizer = load_tokenizer(source, cfg.model)
    chat = use_chat_template(tokenizer, cfg.model.chat_template)
    seq2seq = is_encoder_decoder(source, cfg.model)
    context = context_length(source, cfg.model)
    limit = max(context, cfg.train.max_length)  # (context_length is capped) a longer OpenAI conversation is refused
    tasks = []
    for i, tc in enumerate(cfg.tasks):
        tasks.append(build_task(tc, cfg, PromptFormat(tokenizer, chat, seq2seq=seq2seq, context=limit),
                                f"tasks.{i}.data ({tc.name})"))
    held = [build_task(tc, cfg, PromptFormat(tokenizer, chat, seq2seq=seq2seq, context=limit),
                       f"forgetting.{i}.data ({tc.name})", True) for i, tc in enumerate(cfg.forgetting)]
    _bf16_where_native(cfg)
    for line in resolve_auto(cfg.train, tasks):  # `train.epochs/lr: auto`, from the training split
        say(line)
    preflight.check(cfg, source, tasks + held)  # what the config decides, before any folder
    return Prepared(cfg, source, tokenizer, chat, context, tasks, held, seq2seq)


def _bf16_where_native(cfg: ExperimentConfig) -> None:
    """On a CPU without native bfloat16 (no AVX512-BF16 or AMX), bf16 matmuls are emulated, several times slower
    than fp32: evaluation then runs in fp32 (more exact, and faster there), said once. Training keeps what was
    asked (`train.bf16` also halves LoRA's frozen weights), with a warning about the speed."""
    where = device()
    if native_bf16(where):
        return
    if cfg.evaluate.bf16:
        cfg.evaluate.bf16 = False
        warn(f"evaluate.bf16: this {where.type.upper()} has no native bfloat16 (AVX512-BF16 or AMX), where bf16 is "
             "several times slower than fp32: evaluating in fp32")
    if cfg.train.bf16:
        warn(f"train.bf16: this {where.type.upper()} has no native bfloat16 (AVX512-BF16 or AMX): training will be "
             "several times slower than in fp32; set train.bf16: false unless you need the memory")


def build_task(tc: TaskConfig, cfg: ExperimentConfig, fmt: PromptFormat, where: str, held_out: bool = False) -> Task:
    """Read a task's data once, pick its template from the records' shape, split, render the pairs."""
    sources = read_sources(tc.data)
    template = build_task_template(tc, detect_shape(next(iter(sources.values()))[0].data), cfg.evaluate.max_new_tokens,
                                   cfg.limits)
    choices = tasktypes.get(tc.type).choices  # a closed label set: stratified splits, choices checked
    label_of = label_getter(template) if choices else None
    records = split_sources(sources, tc.data, cfg.seed, label_of, where)
    if choices and template.choices is None:
        template.choices = sorted({label_of(r) for r in records["train"]} - {""})
    pairs = {split: [template.pair(r) for r in rs] for split, rs in records.items()}
    if cfg.baseline.enabled and not held_out and len(pairs["train"]) < cfg.baseline.k:
        raise InstructuneError(f"the training split has {len(pairs['train'])} example(s), too few to supply "
                               f"the {cfg.baseline.k}-shot examples (baseline.k)", where)
    if choices and not template.strict_choices:  # choices taken from the training labels
        for split in ("validation", "test"):
            for p in pairs.get(split, []):
                template.check_label(p.completion, p.where)
    fmt = PromptFormat(fmt.tok, fmt.chat, template.separator, fmt.seq2seq, context=fmt.context)
    task = Task(template, records, pairs, fmt, held_out)
    if template.template is None and any("messages" in p.record for p in pairs["train"]):
        for split in pairs:  # OpenAI's checks that need tokens (too long, tool support): before anything is written
            task.encoded(split, cfg.train.max_length)
    if not held_out:
        task.leakage = find_leakage([input_text(template, p) for p in pairs["train"]],
                                    [input_text(template, p) for p in pairs["test"]], cfg.evaluate.leakage_threshold)
        if task.leakage["exact"] or task.leakage["near"]:
            warn(f"{task.name}: {task.leakage['exact']} test input(s) also in the training split and "
                 f"{task.leakage['near']} near duplicate(s) (leakage inflates test scores)")
    return task


def input_text(template: TaskTemplate, pair: Pair) -> str:
    """The input a test item gives the model, without template boilerplate (for the leakage check)."""
    if template.template is None:
        return " ".join(m["content"] for m in pair.messages if m["role"] == "user")
    inputs = [template.fields.get(f, f) for f in tasktypes.get(template.type).inputs]
    values = [pair.record[f] for f in inputs if f in pair.record]
    if not values:  # a user template over other field names: every field but the answer
        answer = template.answer_field()
        values = [v for k, v in pair.record.items() if k != answer]
    return " ".join(str(v) for v in values if isinstance(v, (str, int, float)))


def label_getter(template: TaskTemplate):
    """A function of a record: its classification label as a string ("" when it has none)."""
    field_name = template.answer_field()

    def label_of(record: Record):
        if template.template is None:
            return str(record.data.get("completion", record.data.get("output", ""))).strip()
        return str(record.data.get(field_name, "")).strip()
    return label_of


def data_fingerprint(tasks: list[Task]) -> str:
    h = hashlib.sha256()
    for t in tasks:
        for split in ("train", "validation", "test"):
            for p in t.pairs.get(split, []):
                rich = [p.tools, p.trained, p.answer, p.answer_weight] if p.conversation else []  # weights, tools
                h.update(json.dumps([t.name, split, p.messages, p.completion, *rich], sort_keys=True).encode())
    return h.hexdigest()[:16]


def data_stats(prep: Prepared) -> dict:
    """Per task: split sizes, token lengths of the training pairs (prompt, completion) and the leakage check."""
    out = {}
    for task in prep.tasks:
        encoded = task.encoded("train", prep.cfg.train.max_length)
        completion = [e.n_supervised for e in encoded]
        cut = [e for e in encoded if e.cut]
        out[task.name] = {"sizes": {split: len(v) for split, v in task.pairs.items()},
                          "token_lengths": {"prompt": [len(e.input_ids) - (0 if e.seq2seq else c)
                                                       for e, c in zip(encoded, completion)],
                                            "completion": completion},
                          "truncated": {"pairs": len(cut), "max_cut": max((e.cut for e in cut), default=0),
                                        "examples": [{"where": e.where, "text": f"{e.cut} tokens cut"} for e in cut[:3]]},
                          "leakage": task.leakage}
    return out


def turn_stats(task: Task, max_length: int) -> dict | None:
    """A chat task's training conversations turn by turn, for `data lint`: the most tokens of a turn per role, the
    trained assistant turns, and per conversation that `train.max_length` cuts, what each turn loses (None: the
    task has no chat records, or the model no chat template)."""
    pairs = [(p, e) for p, e in zip(task.pairs.get("train", []), task.encoded("train", max_length))
             if "messages" in p.record]
    if not pairs or not task.fmt.chat or task.fmt.seq2seq:
        return None
    most: dict[str, int] = {}
    trained, cut = 0, []
    for p, e in pairs:
        turns = turn_report(task.fmt.tok, p, e.cut, e.cut_end)
        for t in turns:
            most[t["role"]] = max(most.get(t["role"], 0), t["tokens"])
            trained += t["trained"]
        if e.cut:
            cut.append({"where": e.where, "text": "; ".join(
                f"turn {i} ({t['role']}{', trained' if t['trained'] else ''}) loses {t['cut']} of {t['tokens']} tokens"
                for i, t in enumerate(turns) if t["cut"])})
    return {"max_tokens": most, "trained_turns": trained, "conversations": len(pairs), "cut": cut}


def manifest(prep: Prepared, extra: dict) -> Manifest:
    """What is saved beside a fine-tuned model: how to render its prompts, what it came from, and how it trained."""
    cfg = prep.cfg
    preset = PRESETS.get(cfg.model.name)
    return Manifest.model_validate({
        "version": VERSION,
        "base_model": prep.model_source,
        "base_model_hub_id": preset.hub_id if preset else cfg.model.name,
        "method": cfg.train.method,
        "chat_template": prep.chat,
        "encoder_decoder": prep.seq2seq,
        "tasks": {t.name: t.template.to_dict() for t in prep.tasks},
        "held_out_tasks": {t.name: t.template.to_dict() for t in prep.held_out},
        "data_fingerprint": data_fingerprint(prep.tasks),
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        **extra,
    })
