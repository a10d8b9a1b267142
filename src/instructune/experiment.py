"""The experiment protocol, top to bottom: data → base-model baselines → fine-tuning → evaluation → report.

Each stage reads what earlier stages wrote in the run folder, so `instructune baseline/train/evaluate/report`
can run one at a time. Everything that can fail on bad input (config, data, templates, k-shot supply, model
path, the run folder itself) is checked before the run folder is created or changed. Each stage records what it
was made from (`rundir.begin`/`finish`); redoing a stage first removes what depended on it."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .config import ExperimentConfig
from .errors import InstructuneError
from .evaluate.best_prompt import best_prompt, candidates
from .evaluate.classical import classical_variant
from .evaluate.score import answer, primary, score, validation_scorer
from .io import atomic_write, old_copy, read_json, write_json
from . import allocator, rundir, tracking
from .models import count_parameters, hf_config, load_finetuned, load_for_inference, save_model
from .prompts import Pair, PromptFormat
from .prompts.shots import kshot_prompts
from .report import write_report
from .runtime import device, distributed, is_main_process, local_processes, say, warn
from .tasks import Prepared, data_fingerprint, data_stats, manifest, prepare
from .train.audit import audit_masking
from .train.checkpoint import newest_checkpoint, remove_checkpoints
from .train import memory
from .train.loop import train
from .train.loss import perplexity
from .train.strategy import prefix_pass, strategy_for


def run(cfg: ExperimentConfig, resume: bool = False, restart: bool = False, force: bool = False,
        device_memory: float | None = None) -> dict:
    """The whole protocol. With `resume`, a finished baseline made from the same inputs is kept and training
    continues from its checkpoint; with `restart`, a checkpoint left there is discarded (without either it is
    refused). A training the memory plan says cannot fit is refused before anything is loaded, unless `force`."""
    check_run_folder(cfg)
    check_checkpoint(cfg, resume, restart)
    prep = prepare(cfg)
    check_fits(prep, device_memory, force)
    run_dir = start_run(cfg, prep)
    try:
        if cfg.baseline.enabled and not (resume and _current(run_dir, "baseline", baseline_inputs(prep))):
            run_baseline(prep, run_dir)
        run_train(prep, run_dir, resume, restart)
        run_evaluate(prep, run_dir)
        return report(run_dir, cfg)
    finally:
        rundir.release()


def start_run(cfg: ExperimentConfig, prep: Prepared) -> Path:
    """Create (or reuse) the run folder, only once `prepare` found no bad input, and lock it for this command;
    record the resolved config and data stats."""
    tracking.check(cfg)  # the MLflow client is installed, before anything is written
    run_dir = rundir.create(cfg.run_dir(), output_key(cfg))
    if is_main_process():
        atomic_write(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        write_json(run_dir / "data_stats.json", data_stats(prep))
    return run_dir


def check_run_folder(cfg: ExperimentConfig) -> None:
    """Refuse a run folder instructune must not write into before anything is loaded (`start_run` checks again)."""
    if is_main_process():
        rundir.check_output_dir(cfg.run_dir(), output_key(cfg))


def check_checkpoint(cfg: ExperimentConfig, resume: bool, restart: bool) -> None:
    """A checkpoint an interrupted training left in the run folder is never replaced silently: refused unless
    `--resume` continues it or `--restart` discards it (every process refuses alike, before any is started)."""
    if resume and restart:
        raise InstructuneError("--resume continues the checkpoint and --restart discards it: give one", "--restart")
    folder = cfg.run_dir() / "checkpoint"
    found = [p for p in (folder, old_copy(folder)) if p.is_dir() and any(p.iterdir())]
    if not found or resume or restart:
        return
    meta = read_json(found[0] / "meta.json") if (found[0] / "meta.json").is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    changed = rundir.differences(meta.get("config"), _train_config(cfg)) if meta.get("config") else []
    made = (f"made with other training settings ({'; '.join(changed[:3])}), so --resume would refuse it"
            if changed else "made with these training settings")
    raise InstructuneError(f"the run folder holds the checkpoint of an unfinished training (step {meta.get('step', '?')}, "
                           f"{made}): pass --resume to continue it, or --restart to discard it and train from the "
                           "start", str(found[0]))


def output_key(cfg: ExperimentConfig) -> str:
    """The config key that names the run folder (for messages about it)."""
    return "output_dir" if cfg.output_dir else "name"


# What each stage is made from: when any of it changes, the stage's output is no longer a result of this config.
def baseline_inputs(prep: Prepared) -> dict:
    return {"data": data_fingerprint(prep.tasks + prep.held_out), "model": _model_identity(prep),
            "config": _baseline_config(prep.cfg)}


def train_inputs(prep: Prepared) -> dict:
    return {"data": data_fingerprint(prep.tasks), "model": _model_identity(prep), "config": _train_config(prep.cfg)}


def evaluate_inputs(prep: Prepared, trained_by: str) -> dict:
    return {"data": data_fingerprint(prep.tasks + prep.held_out), "model": trained_by,
            "config": _answer_settings(prep.cfg)}


def _model_identity(prep: Prepared) -> dict:
    return {"source": prep.model_source, **prep.cfg.model.model_dump(mode="json")}


def _baseline_config(cfg: ExperimentConfig) -> dict:
    return {"seed": cfg.seed, "baseline": cfg.baseline.model_dump(mode="json"), "answers": _answer_settings(cfg)}


def _train_config(cfg: ExperimentConfig) -> dict:
    train = cfg.train.model_dump(mode="json", exclude={"save_every", "tensorboard"})
    return {"seed": cfg.seed, "train": train, "max_new_tokens": cfg.evaluate.max_new_tokens}


def _answer_settings(cfg: ExperimentConfig) -> dict:
    return cfg.evaluate.model_dump(mode="json", include={"batch_size", "bf16", "max_new_tokens", "classification_mode"})


def _current(run_dir: Path, stage: str, inputs: dict) -> bool:
    record = rundir.status(run_dir)["stages"].get(stage)
    return bool(record and record.get("complete") and record["inputs"] == inputs)


# -- 1. baselines: the base model zero-, one- and k-shot on the test split ------------------------------------------
def run_baseline(prep: Prepared, run_dir: Path) -> dict:
    cfg = prep.cfg
    rundir.begin(run_dir, "baseline", baseline_inputs(prep))
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
        if not task.held_out and cfg.baseline.classical and \
                (classical := classical_variant(task.template, task.records, cfg.seed)) is not None:
            results[task.name]["classical"] = classical
            say(f"{task.name}: classical baseline ({classical['method']['method']}) {primary(task.template, classical)}")
        if not task.held_out and cfg.baseline.templates != "one" and \
                (options := candidates(task.template, cfg.baseline.templates, "baseline.templates")):
            results[task.name]["base_best_prompt"] = result = best_prompt(
                model, task.fmt, options, task.records, cfg.baseline.shots, cfg.seed, prep.context_length,
                cfg.evaluate, task.name)
            say(f"{task.name}: base best prompt ({result['choice']['template']}, {result['choice']['shots']}-shot, "
                f"chosen on validation) {primary(task.template, result)}")
        if not task.held_out and task.pairs.get("validation"):
            results[task.name]["perplexity"] = _perplexity(model, task.fmt, task.pairs["validation"], cfg, task.template.max_new_tokens)
    write_json(run_dir / "baseline.json", results)
    rundir.finish(run_dir, "baseline")
    return results


# -- 2. fine-tuning: completion-only loss on the training split -------------------------------------------------------
def run_train(prep: Prepared, run_dir: Path, resume: bool = False, restart: bool = False, scorer=None) -> Path:
    """`scorer(model) -> float`: the validation metric instead of `train.eval_metric`'s (a sweep's trial reports it)."""
    import torch

    cfg, checkpoint, inputs = prep.cfg, run_dir / "checkpoint", train_inputs(prep)
    if restart and is_main_process() and newest_checkpoint(checkpoint):
        remove_checkpoints(checkpoint)
        say(f"--restart: removed the checkpoint in {checkpoint}; training from the start")
    train_id = (rundir.begin(run_dir, "train", inputs, keep=("train_log.jsonl", "tensorboard") if resume else ())
                if is_main_process() else None)
    scorer = scorer or _validation_scorer(prep)
    world = distributed()[1]
    strategy = strategy_for(cfg.train, world, None, scorer)  # one process, DDP or FSDP, for all of training
    torch.manual_seed(cfg.seed)
    # a fresh copy (the baseline's is never touched); under FSDP each process builds and reads only its shards
    model = strategy.training_model(prep.model_source, cfg.model, cfg.train)
    # the peak counts training, which the plan is for: from the loaded model on (a load's own transients, and the
    # page cache of the weight files it maps, are not what training holds; the loading test measures those)
    memory.reset_peak(device())
    trainable, total = count_parameters(model)
    say(f"{cfg.train.method}: {trainable:,} of {total:,} weights trainable ({100 * trainable / total:.2f} %)")
    train_set, val_set, audit = _training_data(prep)
    planned = memory_plan(prep, train_set)(strategy.plan_name, world)
    host = allocator.name()  # read from /proc once: the process's allocator does not change
    say(f"memory plan: {planned.line()}; host allocator {host}")
    if resume and not newest_checkpoint(checkpoint):
        say("no checkpoint to resume from: training from the start")
    with tracking.training(cfg, run_dir, inputs["data"], resume) as on_step:  # MLflow, when configured
        log = train(model, train_set, val_set, cfg.train, prep.tokenizer.pad_token_id, cfg.seed,
                    log_path=run_dir / "train_log.jsonl", checkpoint_dir=checkpoint, resume=resume,
                    tensorboard_dir=run_dir / "tensorboard" if cfg.train.tensorboard else None, score_fn=scorer,
                    checkpoint_meta=inputs, measured=(measured := {}), strategy=strategy, on_step=on_step)
    _say_kept_step(cfg, log)
    say(f"peak memory per process: {max(measured['peak']) / memory.GB:.2f} GB (planned {planned.peak / memory.GB:.2f} GB)")
    return _save_trained(prep, run_dir, strategy.gather(model), {
        "audit": audit, "final_loss": log[-1]["loss"] if log else None, "train_id": train_id,
        "trainable_parameters": trainable, "total_parameters": total,
        "memory": {"planned": planned.parts, "planned_peak": planned.peak, "strategy": planned.strategy,
                   "host_allocator": host, **measured}})


def training_examples(prep: Prepared) -> list:
    """Every task's training examples, encoded as training reads them (each task encodes them once)."""
    return [e for t in prep.tasks for e in t.encoded("train", prep.cfg.train.max_length)]


def _training_data(prep: Prepared) -> tuple[list, list, dict]:
    """Every task's encoded training and validation examples, and the training split's masking audit (stated)."""
    cfg = prep.cfg.train
    train_set = training_examples(prep)
    val_set = [e for t in prep.tasks for e in t.encoded("validation", cfg.max_length)[: cfg.max_validation]]
    audit = audit_masking(train_set, set().union(*(t.fmt.end_ids() for t in prep.tasks)), "train split")
    say(f"masking audit: {audit['supervised_tokens']:,} of {audit['tokens']:,} tokens supervised "
        f"({100 * audit['supervised_share']:.1f} %) in {audit['trained_turns']:,} trained turns, each ending with "
        "its end token")
    return train_set, val_set, audit


def _validation_scorer(prep: Prepared):
    """With `train.eval_metric`: each task's own metric by generation on its first `metric_samples` validation pairs."""
    cfg = prep.cfg
    if not cfg.train.eval_metric:
        return None
    return validation_scorer([(t.template, t.fmt, t.pairs.get("validation", [])[: cfg.train.metric_samples])
                              for t in prep.tasks], cfg.evaluate.batch_size, cfg.train.bf16)


def _save_trained(prep: Prepared, run_dir: Path, model, facts: dict) -> Path:
    """Process 0 saves the trained model (under FSDP `strategy.gather` made it whole there; the others hold None)
    with its manifest, then removes the checkpoints it replaces and finishes the stage."""
    out = run_dir / "model"
    if distributed()[0] > 0:
        return out  # process 0 saves
    save_model(model, prep.tokenizer, out, manifest(prep, facts))
    remove_checkpoints(run_dir / "checkpoint")  # the finished model replaces them
    rundir.finish(run_dir, "train")
    return out


def memory_plan(prep: Prepared, train_set: list, train_cfg=None, gpu: bool | None = None):
    """`plan(strategy, processes) -> Footprint`: what each training process will hold (`train/memory.py`) for this
    model and the largest training pass; `train_cfg`: other training settings for the same model and data; `gpu`:
    on a CUDA GPU or a CPU (default: this machine's device)."""
    cfg = train_cfg or prep.cfg.train
    gpu = device().type == "cuda" if gpu is None else gpu
    key = (str(prep.model_source), prep.cfg.model.model_dump_json(), cfg.method, cfg.lora.model_dump_json())
    if key not in _SHAPES:  # the model built on the meta device, once per method (advice tries several)
        _SHAPES[key] = memory.model_shape(hf_config(prep.model_source, prep.cfg.model), cfg.method, cfg.lora)
    shape = _SHAPES[key]
    lengths, supervised = [len(e.input_ids) for e in train_set], [e.n_supervised for e in train_set]
    evaluation = 0
    if cfg.eval_metric and train_set:  # generation on validation between steps: the longest prompt stands for them
        prompt = max(len(e.input_ids) - e.n_supervised for e in train_set)
        evaluation = memory.generation_bytes(shape, min(prep.cfg.evaluate.batch_size, cfg.metric_samples), prompt,
                                             max(t.template.max_new_tokens for t in prep.tasks), cfg.bf16)
    passes = memory.passes_per_step(lengths, cfg.batch_size, cfg.pass_tokens, cfg.grad_accum)
    sizes = {}  # the largest pass, by whether the shared prefix may run as a pass of its own (`prefix_pass`)

    def plan(strategy: str, processes: int) -> memory.Footprint:
        two_pass = prefix_pass(strategy, processes, cfg.gradient_checkpointing)
        if two_pass not in sizes:
            sizes[two_pass] = memory.pass_size(lengths, supervised, cfg.batch_size, cfg.pass_tokens,
                                               examples=train_set, packing=cfg.packing,
                                               share_prefix=cfg.share_prefix, two_pass=two_pass)
        tokens, trained = sizes[two_pass]
        return memory.footprint(shape, strategy, processes, tokens=tokens, supervised=trained,
                                evaluation=evaluation, device="cuda" if gpu else "cpu", passes=passes,
                                **memory.plan_options(cfg))

    return plan


_SHAPES: dict = {}


def fit_advice(prep: Prepared, train_set: list, strategy: str, processes: int, limit: float,
               gpu: bool | None = None) -> str | None:
    """None when the plan fits in `limit` bytes per process; else what it needs and the cheapest changes to the
    config after which it fits (`memory.FIXES`, in order), each with its planned peak."""
    plan = memory_plan(prep, train_set, gpu=gpu)(strategy, processes)
    if plan.fits(limit):
        return None
    found = memory.fixes(lambda t: memory_plan(prep, train_set, t, gpu)(strategy, processes), prep.cfg.train, limit)
    need = (f"train.method: {prep.cfg.train.method} needs ~{plan.peak / memory.GB:.1f} GB per process ({strategy} x "
            f"{processes}), more than the {memory.HEADROOM * limit / memory.GB:.1f} GB it may use (90 % of "
            f"{limit / memory.GB:.3g} GB)")
    if not found:
        return (need + "; no single change in `instructune.train.memory.FIXES` makes it fit: a smaller model, "
                "shorter train.max_length, or more processes with train.strategy: fsdp (`instructune plan`)")
    return need + "; changes that make it fit, cheapest first: " + "; ".join(
        f"{memory.change_text(c)} → {p.peak / memory.GB:.1f} GB" for c, p in found)


def check_fits(prep: Prepared, device_memory: float | None = None, force: bool = False) -> None:
    """Refuse (exit 2, with the advice) a training the memory plan says cannot fit, before anything is loaded or
    written; `device_memory` GB per process (default: this GPU, or this machine's memory shared by the processes
    running on it); `force` trains anyway, with a warning."""
    world = int(os.environ.get("WORLD_SIZE") or 1)  # the process group is not needed (nor made) for this
    if device_memory:
        limit = device_memory * memory.GB
    else:
        limit = memory.device_memory()[0] / (1 if device().type == "cuda" else local_processes())
    advice = fit_advice(prep, training_examples(prep), prep.cfg.train.strategy if world > 1 else "ddp", world, limit)
    if advice and not force:
        raise InstructuneError(f"the memory plan says this training does not fit: {advice} (--force trains anyway)",
                               "--device-memory" if device_memory else "train")
    if advice:
        warn(f"--force: training although the memory plan says it does not fit: {advice}")


def _say_kept_step(cfg: ExperimentConfig, log: list[dict]) -> None:
    if cfg.train.keep_best and any("val_loss" in e for e in log):
        key = "val_metric" if cfg.train.eval_metric else "val_loss"
        sign = 1 if key == "val_metric" else -1
        best = max((e for e in log if key in e), key=lambda e: sign * e[key])
        say(f"kept the weights of step {best['step']} (best {key.replace('_', ' ')} {best[key]:.4f})")


# -- 3. evaluation: the fine-tuned model on the same test split, rendered exactly as in training -----------------
def run_evaluate(prep: Prepared, run_dir: Path) -> dict:
    cfg = prep.cfg
    trained = rundir.require(run_dir, "train", train_inputs(prep))
    rundir.begin(run_dir, "evaluate", evaluate_inputs(prep, trained["id"]))
    model, tokenizer, meta = load_finetuned(run_dir / "model")
    templates = meta.templates(held_out=True)  # render exactly as in training
    results = {}
    for task in prep.tasks + prep.held_out:
        saved = templates.get(task.name)
        if saved is None:
            raise InstructuneError(f"the model in this run was not trained with task {task.name!r}; run `instructune "
                                   f"train` again after changing the tasks", str(run_dir / "model"))
        fmt = meta.prompt_format(tokenizer, saved.separator)
        prompts = [fmt.pair_prompt(saved.pair(r)) for r in task.records["test"]]
        preds, mode = answer(model, fmt, saved, prompts, cfg.evaluate, f"{task.name}: fine-tuned")
        results[task.name] = {"finetuned": score(task.template, task.pairs["test"], preds, prompts, mode)}
        results[task.name]["finetuned"]["prompts_cut"] = fmt.prompts_cut(prompts, saved.max_new_tokens)
        if not task.held_out and task.records.get("validation"):
            results[task.name]["perplexity"] = _perplexity(model, fmt, [saved.pair(r) for r in task.records["validation"]], cfg,
                                                         saved.max_new_tokens)
        say(f"{task.name}: fine-tuned {primary(task.template, results[task.name]['finetuned'])}")
    write_json(run_dir / "finetuned.json", results)
    rundir.finish(run_dir, "evaluate")
    return results


def _perplexity(model, fmt: PromptFormat, pairs: list[Pair], cfg: ExperimentConfig, answer_tokens: int) -> float:
    """On the first `train.max_validation` validation pairs, as rendered for training."""
    encoded = [fmt.encode(p, cfg.train.max_length, answer_tokens) for p in pairs[: cfg.train.max_validation]]
    return perplexity(model, encoded, fmt.tok.pad_token_id, cfg.evaluate.batch_size, cfg.evaluate.bf16)


# -- 4. report: only from stage outputs made from one config, data and model ------------------------------------
def report(run_dir: Path, cfg: ExperimentConfig) -> dict:
    """results.json, report.md and report.html, refused when a stage's output is missing, unfinished or was made
    from other inputs than the others (it names the stage to rerun)."""
    trained = rundir.require(run_dir, "train", {"config": _train_config(cfg)})
    evaluated = rundir.require(run_dir, "evaluate", {"model": trained["id"], "config": _answer_settings(cfg)})
    if cfg.baseline.enabled:
        rundir.require(run_dir, "baseline", {"data": evaluated["inputs"]["data"], "model": trained["inputs"]["model"],
                                             "config": _baseline_config(cfg)})
    rundir.begin(run_dir, "report", {"train": trained["id"], "evaluate": evaluated["id"]})
    results = write_report(run_dir, cfg)
    tracking.finish(run_dir, cfg, results)  # MLflow, when configured: final metrics, report and results
    rundir.finish(run_dir, "report")
    return results
