"""The `instructune` command: parses, calls the Python API, prints. Bad input ends with a message and exit status 2."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import InstructuneError

app = typer.Typer(
    help="Instruction fine-tuning from baseline to report.\n\n"
         "An experiment config (YAML) names a base model and tasks (data + template). `instructune run CONFIG` "
         "measures the base model zero-, one- and k-shot on the test split, fine-tunes it (LoRA or full) on the "
         "training split with loss on completion tokens only, evaluates the result the same way and writes "
         "results.json and report.md in the run folder (runs/<name>).\n\n"
         "Example: instructune run configs/demo.yaml --set train.epochs=1",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Look at the instruction data a config makes.", no_args_is_help=True)
app.add_typer(data_app, name="data")

RESUME_HELP = ("continue an interrupted training from runs/<name>/checkpoint (written every train.save_every steps), "
               "exactly as if never stopped")
SET_HELP = "Override a config key, e.g. --set train.epochs=1 --set tasks.0.data.max_test=20 (repeatable)."


def handles_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InstructuneError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
    return wrapper


def _config(path: Path, overrides: list[str] | None):
    from .config import load_config

    return load_config(path, overrides or [])


@app.command()
@handles_errors
def run(config: Path = typer.Argument(..., help="experiment YAML"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
        resume: bool = typer.Option(False, help=RESUME_HELP)):
    """Everything: data → base-model baselines → fine-tuning → evaluation → report."""
    from .experiment import run as run_experiment
    from .runtime import check_launcher

    check_launcher()
    cfg = _config(config, set_)
    results = run_experiment(cfg, resume)
    _summary(results, cfg.run_dir())


@app.command()
@handles_errors
def baseline(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Measure the base model zero-shot, one-shot and k-shot on the test split (writes baseline.json)."""
    from .experiment import run_baseline, start_run
    from .tasks import prepare

    cfg = _config(config, set_)
    prep = prepare(cfg)
    run_baseline(prep, start_run(cfg, prep))


@app.command()
@handles_errors
def train(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
          resume: bool = typer.Option(False, help=RESUME_HELP)):
    """Fine-tune on the training split (writes model/ with the adapter or weights, tokenizer and manifest)."""
    from .experiment import run_train, start_run
    from .runtime import check_launcher
    from .tasks import prepare

    check_launcher()
    cfg = _config(config, set_)
    prep = prepare(cfg)
    out = run_train(prep, start_run(cfg, prep), resume)
    typer.echo(f"model written to {out}")


@app.command()
@handles_errors
def evaluate(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Evaluate the fine-tuned model of the run on the test split (writes finetuned.json)."""
    from .experiment import run_evaluate
    from .tasks import prepare

    cfg = _config(config, set_)
    prep = prepare(cfg)
    run_evaluate(prep, cfg.run_dir())


@app.command()
@handles_errors
def report(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Write results.json and report.md from what the earlier stages wrote."""
    from .report import write_report

    cfg = _config(config, set_)
    _summary(write_report(cfg.run_dir(), cfg), cfg.run_dir())


@data_app.command("preview")
@handles_errors
def data_preview(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
                 n: int = typer.Option(2, help="pairs shown per task"),
                 split: str = typer.Option("train", help="train, validation or test")):
    """Show rendered prompt→completion pairs and which tokens are trained (green) or masked (dim)."""
    from rich.console import Console
    from rich.text import Text

    from .prompts.format import IGNORE
    from .tasks import prepare
    from .train.audit import audit_masking

    cfg = _config(config, set_)
    prep = prepare(cfg)
    console = Console()
    for task in prep.tasks:
        pairs = task.pairs.get(split, [])
        encoded = task.encoded(split, cfg.train.max_length)
        console.rule(f"{task.name} ({task.template.type}) — {len(pairs)} {split} pairs")
        for enc in encoded[:n]:
            text = Text()
            for tid, label in zip(enc.input_ids, enc.labels):
                piece = prep.tokenizer.decode([tid])
                text.append(piece, style="bold green" if label != IGNORE else "dim")
            console.print(Text(enc.where, style="cyan"))
            console.print(text)
            console.print()
        audit = audit_masking(encoded, task.fmt.end_ids(), f"{task.name} {split}")
        console.print(f"supervised tokens: {audit['supervised_tokens']:,} of {audit['tokens']:,} "
                      f"({100 * audit['supervised_share']:.1f} %); end-of-sequence trained in every example")


@data_app.command("lint")
@handles_errors
def data_lint(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Check the data before spending compute: split sizes, labels, supervised tokens, train/test leakage."""
    from collections import Counter

    from .tasks import data_stats, prepare

    cfg = _config(config, set_)
    prep = prepare(cfg)  # bad input fails here, with file and line
    stats = data_stats(prep)
    problems = 0
    for task in prep.tasks:
        st = stats[task.name]
        typer.secho(f"{task.name} ({task.template.type})", bold=True)
        typer.echo("  splits: " + ", ".join(f"{k} {v}" for k, v in st["sizes"].items()))
        if task.template.type == "classification":
            for split in ("train", "test"):
                counts = Counter(p.completion for p in task.pairs.get(split, []))
                typer.echo(f"  {split} labels: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
        lengths = st["token_lengths"]
        typer.echo(f"  tokens per training pair: prompt max {max(lengths['prompt'])}, completion max "
                   f"{max(lengths['completion'])}; supervised share "
                   f"{sum(lengths['completion']) / (sum(lengths['prompt']) + sum(lengths['completion'])):.1%}")
        lk = st["leakage"]
        leaked = lk["exact"] + lk["near"]
        problems += bool(leaked)
        typer.secho(f"  leakage: {lk['exact']} exact, {lk['near']} near-duplicate test inputs of {lk['test_size']}",
                    fg="yellow" if leaked else None)
        for ex in lk["examples"]:
            typer.echo(f"    test: {ex['test'][:80]!r}\n    train: {ex['train'][:80]!r} ({ex['kind']}, {ex['overlap']:.0%})")
    typer.echo("no warnings" if not problems else f"{problems} task(s) with warnings")


@app.command()
@handles_errors
def generate(text: str = typer.Argument(..., help="the input: plain text for the task's main field, or a JSON record"),
             model: Path = typer.Option(..., "--model", help="a run folder or its model/ folder"),
             task: Optional[str] = typer.Option(None, help="task name (needed when the model learned several)"),
             max_new_tokens: Optional[int] = typer.Option(None)):
    """Answer with a fine-tuned model, rendering the prompt with the template it was trained with."""
    from .evaluate.generate import generate as run_generate
    from .models import load_finetuned
    from .prompts import PromptFormat, TaskTemplate
    from .prompts.library import FIELDS

    model_obj, tokenizer, meta = load_finetuned(model)
    tasks = meta["tasks"]
    if task is None:
        if len(tasks) > 1:
            raise InstructuneError(f"this model learned several tasks; choose one with --task: {sorted(tasks)}", "--task")
        task = next(iter(tasks))
    if task not in tasks:
        raise InstructuneError(f"unknown task {task!r}; this model learned {sorted(tasks)}", "--task")
    template = TaskTemplate.from_dict(tasks[task])
    record = _record_from_text(text, template, FIELDS)
    fmt = PromptFormat(tokenizer, meta["chat_template"], template.separator, meta.get("encoder_decoder", False))
    prompt = fmt.prompt_text(template.prompt_only(record))
    typer.echo(run_generate(model_obj, fmt, [prompt], max_new_tokens or template.max_new_tokens)[0])


def _record_from_text(text: str, template, fields):
    from .data.load import Record

    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            return Record(json.loads(stripped), "TEXT")
        except json.JSONDecodeError as e:
            raise InstructuneError(f"looks like JSON but is not valid ({e.msg})", "TEXT") from None
    if template.template is None:
        return Record({"prompt": text, "completion": ""}, "TEXT")
    needed = fields[template.type][:-1]
    if len(needed) > 1:
        raise InstructuneError(f"a {template.type} task needs a JSON record with {list(needed)}", "TEXT")
    var = needed[0]
    return Record({template.fields.get(var, var): text}, "TEXT")


@app.command()
def templates(task_type: Optional[str] = typer.Argument(None, help="classification, summarization, translation, qa or ner")):
    """List the template library (use a name as a task's `template`)."""
    from .prompts.library import DEFAULT_TEMPLATE, LIBRARY

    for name, t in LIBRARY.items():
        if task_type and not name.startswith(task_type + "/"):
            continue
        default = " (default)" if name in DEFAULT_TEMPLATE.values() else ""
        typer.secho(f"{name}{default}", bold=True)
        typer.echo(f"  prompt:     {t.prompt!r}\n  separator:  {t.separator!r}\n  completion: {t.completion!r}")


@app.command("demo-data")
def demo_data(out: Path = typer.Argument(Path("data/demo")), seed: int = 0):
    """Write the built-in demo suite (five task types, generated by this package's own code)."""
    from .demo.data import write_demo_data

    for p in write_demo_data(out, seed):
        typer.echo(p)


def _summary(results: dict, run_dir: Path) -> None:
    for name, t in results["tasks"].items():
        metric = t["primary_metric"]
        base = t["results"][t["best_base"]][metric] if t["best_base"] else None
        tuned = t["results"]["finetuned"][metric]
        c = t["change_vs_best_base"].get(metric, {})
        line = f"{name}: {metric} fine-tuned {tuned:.4f}"
        if base is not None:
            line += f" vs best base ({t['best_base']}) {base:.4f}: {c['points']:+.2f} points"
        typer.echo(line)
    typer.echo(f"report: {run_dir / 'report.md'} and {run_dir / 'report.html'}  results: {run_dir / 'results.json'}")


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
