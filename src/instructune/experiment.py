"""The experiment protocol, top to bottom: data → base-model baselines → fine-tuning → evaluation → report.

Each stage reads what earlier stages wrote in the run folder, so `instructune baseline/train/evaluate/report`
can run one at a time. Everything that can fail on bad input (config, data, templates, k-shot supply, model
path) is checked by `prepare` before the run folder is created."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ExperimentConfig
from .data import load_task_splits
from .data.load import Record
from .data.leakage import find_leakage
from .data.shapes import detect_shape
from .errors import InstructuneError
from .evaluate.generate import generate
from .evaluate.metrics import PRIMARY_METRIC, compute_metrics
from .models import (PRESETS, count_parameters, is_encoder_decoder, load_model, load_tokenizer, resolve_model,
                     use_chat_template, wrap_lora)
from .prompts import Pair, PromptFormat, TaskTemplate, build_task_template
from .train.loop import distributed

MANIFEST = "instructune.json"


@dataclass
class Task:
    """One task, ready: its template, its records and their rendered pairs per split."""

    template: TaskTemplate
    records: dict[str, list[Record]]
    pairs: dict[str, list[Pair]]
    fmt: PromptFormat
    held_out: bool = False  # a forgetting-check task: never trained on, scored zero-shot before and after
    leakage: dict | None = None

    @property
    def name(self) -> str:
        return self.template.task


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


# -- data -----------------------------------------------------------------------------------------------------------
def prepare(cfg: ExperimentConfig) -> Prepared:
    """Load and check everything that could be bad input; writes nothing."""
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    chat = use_chat_template(tokenizer, cfg.model.chat_template)
    seq2seq = is_encoder_decoder(source, cfg.model)
    context_length = _context_length(source, cfg)
    tasks = []
    for i, (tc, held) in enumerate([(t, False) for t in cfg.tasks] + [(t, True) for t in cfg.forgetting]):
        where = f"forgetting.{i - len(cfg.tasks)}.data ({tc.name})" if held else f"tasks.{i}.data ({tc.name})"
        probe = _first_record(tc.data)
        template = build_task_template(tc, detect_shape(probe.data), cfg.evaluate.max_new_tokens)
        label_of = _label_getter(template) if tc.type == "classification" else None
        records = load_task_splits(tc.data, cfg.seed, label_of, where)
        if tc.type == "classification" and template.choices is None:
            template.choices = sorted({label_of(r) for r in records["train"]} - {""})
        pairs = {split: [template.pair(r) for r in rs] for split, rs in records.items()}
        if cfg.baseline.enabled and not held and len(pairs["train"]) < cfg.baseline.k:
            raise InstructuneError(f"the training split has {len(pairs['train'])} example(s), too few to supply "
                                   f"the {cfg.baseline.k}-shot examples (baseline.k)", where)
        task = Task(template, records, pairs, PromptFormat(tokenizer, chat, template.separator, seq2seq), held)
        if not held:
            task.leakage = find_leakage([_input_text(task, p) for p in pairs["train"]],
                                        [_input_text(task, p) for p in pairs["test"]], cfg.evaluate.leakage_threshold)
            if task.leakage["exact"] or task.leakage["near"]:
                warn(f"{task.name}: {task.leakage['exact']} test input(s) also in the training split and "
                     f"{task.leakage['near']} near duplicate(s) (leakage inflates test scores)")
        tasks.append(task)
    return Prepared(cfg, source, tokenizer, chat, context_length,
                    [t for t in tasks if not t.held_out], [t for t in tasks if t.held_out], seq2seq)


def _input_text(task: Task, pair: Pair) -> str:
    """The input a test item gives the model, without template boilerplate (for the leakage check)."""
    if task.template.template is None:
        return " ".join(m["content"] for m in pair.messages if m["role"] == "user")
    from .prompts.library import FIELDS

    inputs = [task.template.fields.get(f, f) for f in FIELDS[task.template.type][:-1]]
    values = [pair.record[f] for f in inputs if f in pair.record]
    if not values:  # a user template over other field names: every field but the answer
        answer = task.template.answer_field()
        values = [v for k, v in pair.record.items() if k != answer]
    return " ".join(str(v) for v in values if isinstance(v, (str, int, float)))


def _first_record(data) -> Record:
    from .data.load import load_records

    return load_records(data.path or data.train, data.hub_split)[0]


def _label_getter(template: TaskTemplate):
    field = template.answer_field()

    def label_of(record: Record):
        if template.template is None:
            return str(record.data.get("completion", record.data.get("output", "")))
        return str(record.data.get(field, ""))
    return label_of


def _context_length(source: str, cfg: ExperimentConfig) -> int:
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return 2048
    mc = getattr(mc, "text_config", mc)
    return min(getattr(mc, "max_position_embeddings", 2048) or 2048, 8192)


def data_fingerprint(tasks: list[Task]) -> str:
    h = hashlib.sha256()
    for t in tasks:
        for split in ("train", "validation", "test"):
            for p in t.pairs.get(split, []):
                h.update(json.dumps([t.name, split, p.messages, p.completion], sort_keys=True).encode())
    return h.hexdigest()[:16]


# -- baselines ------------------------------------------------------------------------------------------------------
def shots_for(task: Task, index: int, k: int, seed: int) -> list[Pair]:
    """k training examples for test example `index`: a seeded draw, nested (the 1-shot example is the k-shot's first)."""
    rng = random.Random(f"{seed}/{task.name}/{index}")
    return rng.sample(task.pairs["train"], k)


def prompts_for(task: Task, shots: int, seed: int, context_length: int) -> list[str]:
    prompts = []
    for i, pair in enumerate(task.pairs["test"]):
        examples = shots_for(task, i, shots, seed) if shots else []
        text = task.fmt.prompt_text(pair.messages, examples)
        if shots and len(task.fmt.encode_prompt(text)) + task.template.max_new_tokens > context_length:
            examples = sorted(task.pairs["train"], key=lambda p: len(p.completion) + len(str(p.messages)))[:shots]
            text = task.fmt.prompt_text(pair.messages, examples)
        prompts.append(text)
    return prompts


def score(task: Task, predictions: list[str], prompts: list[str], mode: str) -> dict:
    references = [p.completion for p in task.pairs["test"]]
    metrics, signatures = compute_metrics(task.template.type, predictions, references, task.template.choices)
    return {"metrics": metrics, "signatures": signatures, "mode": mode,
            "predictions": [{"prompt": pr, "reference": r, "prediction": p} for pr, r, p in zip(prompts, references, predictions)]}


def run_baseline(prep: Prepared, run_dir: Path, model=None) -> dict:
    cfg = prep.cfg
    model = model or _load_for_inference(prep.model_source, cfg)
    results = {}
    for task in prep.tasks + prep.held_out:
        results[task.name] = {}
        for shots in [0] if task.held_out else cfg.baseline.shots:
            prompts = prompts_for(task, shots, cfg.seed, prep.context_length)
            preds, mode = predict(model, task.fmt, task.template, prompts, cfg, f"{task.name}: base {shots}-shot")
            results[task.name][f"base_{shots}shot"] = score(task, preds, prompts, mode)
            _say(f"{task.name}: base {shots}-shot {_primary(task, results[task.name][f'base_{shots}shot'])}")
        if not task.held_out and task.pairs.get("validation"):
            results[task.name]["perplexity"] = perplexity(model, task.fmt, task.pairs["validation"], cfg)
    write_json(run_dir / "baseline.json", results)
    return results


def predict(model, fmt: PromptFormat, template: TaskTemplate, prompts: list[str], cfg: ExperimentConfig,
            desc: str) -> tuple[list[str], str]:
    """The model's answers and how they were produced: greedy generation, or rank classification by likelihood."""
    if template.type == "classification" and cfg.evaluate.classification_mode == "likelihood" and not fmt.seq2seq:
        from .evaluate.likelihood import classify_by_likelihood

        return classify_by_likelihood(model, fmt, prompts, template.choices, cfg.evaluate.batch_size,
                                      bf16=cfg.evaluate.bf16, desc=desc), "likelihood"
    return generate(model, fmt, prompts, template.max_new_tokens, cfg.evaluate.batch_size, desc=desc,
                    bf16=cfg.evaluate.bf16), "generation"


def perplexity(model, fmt: PromptFormat, pairs: list[Pair], cfg: ExperimentConfig) -> float:
    """exp(mean cross-entropy per completion token) on the validation pairs, as rendered for training."""
    import math

    from .train.loop import validation_loss

    encoded = [fmt.encode(p, cfg.train.max_length) for p in pairs[: cfg.train.max_validation]]
    return math.exp(validation_loss(model, encoded, fmt.tok.pad_token_id, cfg.evaluate.batch_size, cfg.evaluate.bf16))


# -- fine-tuning ----------------------------------------------------------------------------------------------------
def training_model(source: str, model_cfg, train_cfg):
    """The model to fine-tune, on the training device: LoRA-wrapped, or whole for full fine-tuning.

    LoRA under `train.bf16` keeps the frozen weights in bf16: half the memory, and autocast need not cast every
    weight at every pass (on a CPU that cast costs more than the bf16 matmuls save). The adapter, its gradients and
    its optimizer state stay fp32. Full fine-tuning keeps fp32 weights under bf16 autocast."""
    import torch

    frozen_bf16 = train_cfg.bf16 and train_cfg.method == "lora"
    model = load_model(source, model_cfg, torch.bfloat16 if frozen_bf16 else None)
    if train_cfg.method == "lora":
        model = wrap_lora(model, train_cfg.lora)
        if frozen_bf16:
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    return model.to(_device())


def run_train(prep: Prepared, run_dir: Path, resume: bool = False) -> Path:
    import torch

    from .train.collate import audit_masking
    from .train.loop import train

    cfg = prep.cfg
    torch.manual_seed(cfg.seed)
    model = training_model(prep.model_source, cfg.model, cfg.train)  # a fresh copy: the baseline's is never touched
    trainable, total = count_parameters(model)
    _say(f"{cfg.train.method}: {trainable:,} of {total:,} weights trainable ({100 * trainable / total:.2f} %)")
    train_set, val_set = [], []
    for task in prep.tasks:
        train_set += [task.fmt.encode(p, cfg.train.max_length) for p in task.pairs["train"]]
        val_set += [task.fmt.encode(p, cfg.train.max_length) for p in task.pairs.get("validation", [])][: cfg.train.max_validation]
    end_ids = set().union(*(t.fmt.end_ids() for t in prep.tasks))
    audit = audit_masking(train_set, end_ids, "train split")
    _say(f"masking audit: {audit['supervised_tokens']:,} of {audit['tokens']:,} tokens supervised "
         f"({100 * audit['supervised_share']:.1f} %), end-of-sequence supervised in every example")
    checkpoint = run_dir / "checkpoint"
    if resume and not (checkpoint / "state.pt").is_file():
        _say("no checkpoint to resume from: training from the start")
    log = train(model, train_set, val_set, cfg.train, prep.tokenizer.pad_token_id, cfg.seed, run_dir / "train_log.jsonl",
                checkpoint, resume, run_dir / "tensorboard" if cfg.train.tensorboard else None,
                validation_scorer(prep) if cfg.train.eval_metric else None)
    if cfg.train.keep_best and any("val_loss" in e for e in log):
        key = "val_metric" if cfg.train.eval_metric else "val_loss"
        sign = 1 if key == "val_metric" else -1
        best = max((e for e in log if key in e), key=lambda e: sign * e[key])
        _say(f"kept the weights of step {best['step']} (best {key.replace('_', ' ')} {best[key]:.4f})")
    out = run_dir / "model"
    if distributed()[0] > 0:
        return out  # process 0 saves
    save_model(model, prep, out, {"audit": audit, "final_loss": log[-1]["loss"] if log else None,
                                  "trainable_parameters": trainable, "total_parameters": total})
    import shutil

    shutil.rmtree(checkpoint, ignore_errors=True)  # the finished model replaces it
    return out


def validation_scorer(prep: Prepared):
    """The tasks' own metric by greedy generation on a fixed validation subsample, averaged over tasks (0..1)."""
    cfg = prep.cfg
    subsets = [(t, t.pairs.get("validation", [])[: cfg.train.metric_samples]) for t in prep.tasks]
    subsets = [(t, pairs) for t, pairs in subsets if pairs]

    def score(model) -> float:
        values = []
        for task, pairs in subsets:
            prompts = [task.fmt.prompt_text(p.messages) for p in pairs]
            preds = generate(model, task.fmt, prompts, task.template.max_new_tokens, cfg.evaluate.batch_size,
                             desc=f"{task.name}: validation metric", bf16=cfg.train.bf16)
            metrics, _ = compute_metrics(task.template.type, preds, [p.completion for p in pairs], task.template.choices)
            values.append(metrics[PRIMARY_METRIC[task.template.type]])
        return sum(values) / max(len(values), 1)
    return score


def save_model(model, prep: Prepared, out: Path, extra: dict) -> None:
    """The adapter (LoRA) or the full model, the tokenizer, and the manifest with the templates, written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    prep.tokenizer.save_pretrained(tmp)
    write_json(tmp / MANIFEST, manifest(prep, extra))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


def manifest(prep: Prepared, extra: dict) -> dict:
    cfg = prep.cfg
    preset = PRESETS.get(cfg.model.name)
    return {
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
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("instructune", "torch", "transformers", "peft", "accelerate", "rouge-score", "sacrebleu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# -- evaluation -----------------------------------------------------------------------------------------------------
def load_finetuned(model_dir: Path, cfg=None):
    """The fine-tuned model, its tokenizer and its manifest (the templates it was trained with)."""
    from .config import ModelConfig

    model_dir = Path(model_dir)
    if (model_dir / "model" / MANIFEST).is_file():
        model_dir = model_dir / "model"  # a run folder
    if not (model_dir / MANIFEST).is_file():
        raise InstructuneError(f"no {MANIFEST} here: expected a run folder or its model/ folder written by `instructune train`", str(model_dir))
    meta = json.loads((model_dir / MANIFEST).read_text())
    mcfg = ModelConfig(**meta["config"]["model"])
    tokenizer = load_tokenizer(str(model_dir), mcfg)
    return _load_for_inference(str(model_dir), None, mcfg), tokenizer, meta


def run_evaluate(prep: Prepared, run_dir: Path) -> dict:
    cfg = prep.cfg
    model, tokenizer, meta = load_finetuned(run_dir / "model")
    results = {}
    for task in prep.tasks + prep.held_out:
        saved_dict = meta["tasks"].get(task.name) or meta.get("held_out_tasks", {}).get(task.name)
        if saved_dict is None:
            raise InstructuneError(f"the model in this run was not trained with task {task.name!r}; run `instructune "
                                   f"train` again after changing the tasks", str(run_dir / "model"))
        saved = TaskTemplate.from_dict(saved_dict)  # render exactly as in training
        fmt = PromptFormat(tokenizer, meta["chat_template"], saved.separator, meta.get("encoder_decoder", False))
        prompts = [fmt.prompt_text(saved.pair(r).messages) for r in task.records["test"]]
        preds, mode = predict(model, fmt, saved, prompts, cfg, f"{task.name}: fine-tuned")
        results[task.name] = {"finetuned": score(task, preds, prompts, mode)}
        if not task.held_out and task.records.get("validation"):
            results[task.name]["perplexity"] = perplexity(model, fmt, [saved.pair(r) for r in task.records["validation"]], cfg)
        _say(f"{task.name}: fine-tuned {_primary(task, results[task.name]['finetuned'])}")
    write_json(run_dir / "finetuned.json", results)
    return results


def _load_for_inference(source: str, cfg, mcfg=None):
    model = load_model(source, mcfg or cfg.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # one matmul per layer instead of base + low-rank path
    return model.to(_device()).eval()


# -- the whole protocol ---------------------------------------------------------------------------------------------
def run(cfg: ExperimentConfig, resume: bool = False) -> dict:
    """The whole protocol. With `resume`, a finished baseline is kept and training continues from its checkpoint."""
    from .report.write import write_report

    prep = prepare(cfg)
    run_dir = start_run(cfg, prep)
    if cfg.baseline.enabled and not (resume and (run_dir / "baseline.json").is_file()):
        run_baseline(prep, run_dir)
    run_train(prep, run_dir, resume)
    run_evaluate(prep, run_dir)
    return write_report(run_dir)


def start_run(cfg: ExperimentConfig, prep: Prepared) -> Path:
    """Create the run folder (only once `prepare` found no bad input); record the resolved config and data stats."""
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_json(run_dir / "data_stats.json", data_stats(prep))
    return run_dir


def data_stats(prep: Prepared) -> dict:
    """Per task: split sizes, token lengths of the training pairs (prompt, completion) and the leakage check."""
    out = {}
    for task in prep.tasks:
        encoded = [task.fmt.encode(p, prep.cfg.train.max_length) for p in task.pairs["train"]]
        completion = [e.n_supervised for e in encoded]
        out[task.name] = {"sizes": {split: len(v) for split, v in task.pairs.items()},
                          "token_lengths": {"prompt": [len(e.input_ids) - (0 if e.seq2seq else c)
                                                       for e, c in zip(encoded, completion)],
                                            "completion": completion},
                          "leakage": task.leakage}
    return out


def _device():
    from .train.loop import device

    return device()


def _primary(task: Task, result: dict) -> str:
    metric = PRIMARY_METRIC[task.template.type]
    return f"{metric} = {result['metrics'][metric]:.4f}"


def _say(message: str) -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False))


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
