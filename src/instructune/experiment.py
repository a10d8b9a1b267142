"""The experiment protocol, top to bottom: data → base-model baselines → fine-tuning → evaluation → report.

Each stage reads what earlier stages wrote in the run folder, so `instructune baseline/train/evaluate/report`
can run one at a time. Everything that can fail on bad input (config, data, templates, k-shot supply, model
path) is checked by `prepare` before the run folder is created."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from .config import ExperimentConfig
from .errors import InstructuneError
from .evaluate.score import answer, primary, score, validation_scorer
from .io import atomic_write, write_json
from .models import count_parameters, load_finetuned, load_for_inference, save_model, training_model
from .prompts import Pair, PromptFormat, TaskTemplate
from .prompts.shots import kshot_prompts
from .report import write_report
from .runtime import distributed, say
from .tasks import Prepared, data_stats, manifest, prepare
from .train.audit import audit_masking
from .train.checkpoint import has_checkpoint
from .train.loop import train
from .train.loss import perplexity


def run(cfg: ExperimentConfig, resume: bool = False) -> dict:
    """The whole protocol. With `resume`, a finished baseline is kept and training continues from its checkpoint."""
    prep = prepare(cfg)
    run_dir = start_run(cfg, prep)
    if cfg.baseline.enabled and not (resume and (run_dir / "baseline.json").is_file()):
        run_baseline(prep, run_dir)
    run_train(prep, run_dir, resume)
    run_evaluate(prep, run_dir)
    return write_report(run_dir, cfg)


def start_run(cfg: ExperimentConfig, prep: Prepared) -> Path:
    """Create the run folder (only once `prepare` found no bad input); record the resolved config and data stats."""
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_json(run_dir / "data_stats.json", data_stats(prep))
    return run_dir


# -- 1. baselines: the base model zero-, one- and k-shot on the test split ------------------------------------------
def run_baseline(prep: Prepared, run_dir: Path) -> dict:
    cfg = prep.cfg
    model = load_for_inference(prep.model_source, cfg.model)
    results = {}
    for task in prep.tasks + prep.held_out:
        results[task.name] = {}
        for shots in [0] if task.held_out else cfg.baseline.shots:
            prompts = kshot_prompts(task.fmt, task.pairs["test"], task.pairs["train"], shots, cfg.seed, task.name,
                                    prep.context_length - task.template.max_new_tokens)
            preds, mode = answer(model, task.fmt, task.template, prompts, cfg.evaluate, f"{task.name}: base {shots}-shot")
            results[task.name][f"base_{shots}shot"] = result = score(task.template, task.pairs["test"], preds, prompts, mode)
            say(f"{task.name}: base {shots}-shot {primary(task.template, result)}")
        if not task.held_out and task.pairs.get("validation"):
            results[task.name]["perplexity"] = _perplexity(model, task.fmt, task.pairs["validation"], cfg)
    write_json(run_dir / "baseline.json", results)
    return results


# -- 2. fine-tuning: completion-only loss on the training split -------------------------------------------------------
def run_train(prep: Prepared, run_dir: Path, resume: bool = False) -> Path:
    import torch

    cfg = prep.cfg
    torch.manual_seed(cfg.seed)
    model = training_model(prep.model_source, cfg.model, cfg.train)  # a fresh copy: the baseline's is never touched
    trainable, total = count_parameters(model)
    say(f"{cfg.train.method}: {trainable:,} of {total:,} weights trainable ({100 * trainable / total:.2f} %)")
    train_set = [e for t in prep.tasks for e in t.encoded("train", cfg.train.max_length)]
    val_set = [e for t in prep.tasks for e in t.encoded("validation", cfg.train.max_length)[: cfg.train.max_validation]]
    audit = audit_masking(train_set, set().union(*(t.fmt.end_ids() for t in prep.tasks)), "train split")
    say(f"masking audit: {audit['supervised_tokens']:,} of {audit['tokens']:,} tokens supervised "
        f"({100 * audit['supervised_share']:.1f} %), end-of-sequence supervised in every example")
    checkpoint = run_dir / "checkpoint"
    if resume and not has_checkpoint(checkpoint):
        say("no checkpoint to resume from: training from the start")
    scorer = None
    if cfg.train.eval_metric:
        scorer = validation_scorer([(t.template, t.fmt, t.pairs.get("validation", [])[: cfg.train.metric_samples])
                                    for t in prep.tasks], cfg.evaluate.batch_size, cfg.train.bf16)
    log = train(model, train_set, val_set, cfg.train, prep.tokenizer.pad_token_id, cfg.seed,
                log_path=run_dir / "train_log.jsonl", checkpoint_dir=checkpoint, resume=resume,
                tensorboard_dir=run_dir / "tensorboard" if cfg.train.tensorboard else None, score_fn=scorer)
    _say_kept_step(cfg, log)
    out = run_dir / "model"
    if distributed()[0] > 0:
        return out  # process 0 saves
    save_model(model, prep.tokenizer, out, manifest(prep, {
        "audit": audit, "final_loss": log[-1]["loss"] if log else None,
        "trainable_parameters": trainable, "total_parameters": total}))
    shutil.rmtree(checkpoint, ignore_errors=True)  # the finished model replaces it
    return out


def _say_kept_step(cfg: ExperimentConfig, log: list[dict]) -> None:
    if cfg.train.keep_best and any("val_loss" in e for e in log):
        key = "val_metric" if cfg.train.eval_metric else "val_loss"
        sign = 1 if key == "val_metric" else -1
        best = max((e for e in log if key in e), key=lambda e: sign * e[key])
        say(f"kept the weights of step {best['step']} (best {key.replace('_', ' ')} {best[key]:.4f})")


# -- 3. evaluation: the fine-tuned model on the same test split, rendered exactly as in training -----------------
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
        preds, mode = answer(model, fmt, saved, prompts, cfg.evaluate, f"{task.name}: fine-tuned")
        results[task.name] = {"finetuned": score(task.template, task.pairs["test"], preds, prompts, mode)}
        if not task.held_out and task.records.get("validation"):
            results[task.name]["perplexity"] = _perplexity(model, fmt, [saved.pair(r) for r in task.records["validation"]], cfg)
        say(f"{task.name}: fine-tuned {primary(task.template, results[task.name]['finetuned'])}")
    write_json(run_dir / "finetuned.json", results)
    return results


def _perplexity(model, fmt: PromptFormat, pairs: list[Pair], cfg: ExperimentConfig) -> float:
    """On the first `train.max_validation` validation pairs, as rendered for training."""
    encoded = [fmt.encode(p, cfg.train.max_length) for p in pairs[: cfg.train.max_validation]]
    return perplexity(model, encoded, fmt.tok.pad_token_id, cfg.evaluate.batch_size, cfg.evaluate.bf16)
