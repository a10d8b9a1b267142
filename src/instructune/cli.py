"""The `instructune` command: parses, calls the Python API, prints. Every failure ends in one line and an exit
status (EXIT_HELP), never in a traceback."""

from __future__ import annotations

import functools
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from . import tasktypes
from .errors import EXIT_INTERRUPTED, EXIT_OTHER, InstructuneError

EXIT_HELP = ("Exit status: 0 done; 2 bad input (the message names the file:line or config key; nothing is written); "
             "3 training diverged (no model, evaluation or report is written; the last checkpoint is kept); "
             "130 interrupted (Ctrl-C or SIGTERM; the unfinished stage is marked so, rerun it); 1 a file-system fault "
             "(disk full, read-only, permission denied: the message names the path) or an internal error (a one-line "
             "summary and where the full traceback was written).")

app = typer.Typer(
    help="Instruction fine-tuning from baseline to report.\n\n"
         "An experiment config (YAML) names a base model and tasks (data + template). `instructune run CONFIG` "
         "measures the base model zero-, one- and k-shot on the test split, fine-tunes it (LoRA or full) on the "
         "training split with loss on completion tokens only, evaluates the result the same way and writes "
         "results.json and report.md in the run folder (runs/<name>).\n\n"
         "Example: instructune run configs/demo.yaml --set train.epochs=1\n\n" + EXIT_HELP,
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Look at the instruction data a config makes.", no_args_is_help=True)
app.add_typer(data_app, name="data")

RESUME_HELP = ("continue an interrupted training from runs/<name>/checkpoint (written every train.save_every steps), "
               "exactly as if never stopped")
SET_HELP = "Override a config key, e.g. --set train.epochs=1 --set tasks.0.data.max_test=20 (repeatable)."
RESTART_HELP = ("discard the checkpoint an interrupted training left in the run folder and train from the start "
                "(without --resume or --restart such a checkpoint is refused, never silently replaced)")
FORCE_HELP = ("train even when the memory plan (`instructune plan`) says the run does not fit in the device's "
              "memory (without it such a run is refused before anything is loaded, with the changes that fit)")
DEVICE_MEMORY_HELP = ("GB one training process may use (default: this machine's GPU, or on a CPU its memory shared "
                      "by the processes launched on it)")
MAX_TOKENS = 2**20  # the CLI's token counts share the config's bound (config.MAX_TOKENS)


_RUN_DIR: list[Path] = []  # the run folder of the command, once its config is loaded (for error.log)


def handles_errors(fn):
    """One line and the documented exit status for every way a command can fail (see EXIT_HELP)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except InstructuneError as e:
            _fail(f"error: {e}", e.exit_status)
        except KeyboardInterrupt:
            _fail("interrupted: the unfinished stage is marked unfinished in run_status.json; rerun the command",
                  EXIT_INTERRUPTED)
        except OSError as e:
            where = e.filename or "file system"
            _fail(f"error: {where}: {e.strerror or e}", EXIT_OTHER)
        except Exception as e:  # an internal error: a summary here, the traceback in a file
            from .io import file_system_fault

            if fault := file_system_fault(e, _RUN_DIR[-1] if _RUN_DIR else "the folder being written"):
                _fail(f"error: {fault.filename}: {fault.strerror}", EXIT_OTHER)
            _fail(f"internal error: {type(e).__name__}: {str(e)[:300]} (full traceback: {_write_traceback()})",
                  EXIT_OTHER)
        finally:
            signal.signal(signal.SIGTERM, previous)
            from .rundir import release

            release()
    return wrapper


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _fail(message: str, status: int):
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(status)


def _write_traceback() -> Path:
    """The traceback of the error being handled, in the run folder's error.log (or the cache folder's logs)."""
    from .models import cache_dir
    from .rundir import MARKER

    folder = _RUN_DIR[-1] if _RUN_DIR and (_RUN_DIR[-1] / MARKER).is_file() else cache_dir() / "logs"
    path = folder / ("error.log" if folder != cache_dir() / "logs" else f"error-{time.strftime('%Y%m%d-%H%M%S')}.log")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} instructune {' '.join(sys.argv[1:])}\n")
            f.write(traceback.format_exc())
    except OSError:
        return Path("(could not be written)")
    return path


def _config(path: Path, overrides: list[str] | None):
    from .config import load_config

    cfg = load_config(path, overrides or [])
    _RUN_DIR.append(cfg.run_dir())
    return cfg


@app.command()
@handles_errors
def run(config: Path = typer.Argument(..., help="experiment YAML"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
        resume: bool = typer.Option(False, help=RESUME_HELP),
        restart: bool = typer.Option(False, help=RESTART_HELP),
        force: bool = typer.Option(False, help=FORCE_HELP),
        device_memory: Optional[float] = typer.Option(None, min=0.001, max=1e6, help=DEVICE_MEMORY_HELP)):
    """Everything: data → base-model baselines → fine-tuning → evaluation → report."""
    from .experiment import run as run_experiment
    from .runtime import check_launcher

    check_launcher()
    cfg = _config(config, set_)
    results = run_experiment(cfg, resume, restart, force, device_memory)
    _summary(results, cfg.run_dir())


@app.command()
@handles_errors
def sweep(config: Path = typer.Argument(..., help="experiment YAML (its `sweep:` block: the search space)"),
          set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
          trials: Optional[int] = typer.Option(None, min=1, max=10_000, help="trials to finish (default "
                                               "sweep.trials, 20); the first runs the config's own settings"),
          budget: Optional[str] = typer.Option(None, help="wall-clock limit of the search, e.g. 45m, 2h, 90s (default "
                                               "sweep.budget; none: --trials alone); a trial that would not finish "
                                               "in what is left is not started"),
          resume: bool = typer.Option(False, help="continue the sweep in the run folder (after a kill or Ctrl-C): "
                                      "finished trials are kept, an interrupted one runs again")):
    """Choose the training settings on the validation split, then run the experiment with the best model.

    An Optuna search (TPE sampler, seeded; median pruner on the validation metric) over `sweep.space` (default:
    train.lr, train.epochs and, for LoRA, train.lora.r and alpha): each trial fine-tunes and scores the tasks'
    primary metric by generation on the validation split. The best trial's model becomes the run's model; only then
    is the test split read, for the baselines, the evaluation and the report, which compares the chosen settings
    with the config's own (trial 0) on the test split. The study lives in runs/<name>/sweep/study.db.

    Example: instructune sweep configs/uci-sentiment.yaml --budget 45m"""
    from .config import parse_duration
    from .sweep import run_sweep

    try:
        seconds = None if budget is None else parse_duration(budget)
    except ValueError as e:
        raise InstructuneError(str(e), "--budget") from None
    cfg = _config(config, set_)
    _summary(run_sweep(cfg, trials, seconds, resume), cfg.run_dir())


@app.command()
@handles_errors
def baseline(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Measure the base model zero-shot, one-shot and k-shot on the test split (writes baseline.json)."""
    from .experiment import check_run_folder, run_baseline, start_run
    from .tasks import prepare

    cfg = _config(config, set_)
    check_run_folder(cfg)
    prep = prepare(cfg)
    run_baseline(prep, start_run(cfg, prep))


@app.command()
@handles_errors
def train(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
          resume: bool = typer.Option(False, help=RESUME_HELP),
          restart: bool = typer.Option(False, help=RESTART_HELP),
          force: bool = typer.Option(False, help=FORCE_HELP),
          device_memory: Optional[float] = typer.Option(None, min=0.001, max=1e6, help=DEVICE_MEMORY_HELP)):
    """Fine-tune on the training split (writes model/ with the adapter or weights, tokenizer and manifest)."""
    from .experiment import check_checkpoint, check_fits, check_run_folder, run_train, start_run
    from .runtime import check_launcher
    from .tasks import prepare

    check_launcher()
    cfg = _config(config, set_)
    check_run_folder(cfg)
    check_checkpoint(cfg, resume, restart)
    prep = prepare(cfg)
    check_fits(prep, device_memory, force)
    out = run_train(prep, start_run(cfg, prep), resume, restart)
    typer.echo(f"model written to {out}")


@app.command()
@handles_errors
def plan(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
         processes: int = typer.Option(1, min=1, max=100_000, help="training processes (GPUs, or CPU processes)"),
         strategy: Optional[str] = typer.Option(None, help="ddp or fsdp (default: both, side by side)"),
         device_memory: Optional[float] = typer.Option(None, min=0.001, max=1e6, help="GB one process may use (default: "
                                                       "this machine's GPU, or its memory on a CPU)"),
         gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="plan for a CUDA GPU or a CPU, whose memory "
                                            "allocators keep different shares (default: this machine's device)")):
    """Memory per training process before a run: weights, gradients, optimizer state and activations (for the
    config's model, batch size and the longest training examples), under DDP and FSDP, and whether it fits.
    Reads the model's config only, never its weights.

    Example: instructune plan configs/demo.yaml --set train.method=full --processes 8 --device-memory 80"""
    from rich.console import Console
    from rich.table import Table

    from .allocator import name as host_allocator
    from .experiment import fit_advice, memory_plan, training_examples
    from .tasks import prepare
    from .train.memory import GB, device_memory as local_memory

    if strategy not in (None, "ddp", "fsdp"):
        raise InstructuneError(f"--strategy must be ddp or fsdp, not {strategy!r}", "--strategy")
    cfg = _config(config, set_)
    prep = prepare(cfg, weights=False)
    train_set = training_examples(prep)
    limit, where = ((device_memory * GB, f"{device_memory:g} GB (--device-memory)") if device_memory
                    else local_memory())
    planner = memory_plan(prep, train_set, gpu=gpu)
    plans = [planner(s, processes) for s in ([strategy] if strategy else ["ddp", "fsdp"])]
    table = Table(title=f"{cfg.name}: {cfg.train.method} fine-tuning, {processes} process(es), GB per process")
    parts = list(plans[0].parts)
    for col in ["strategy", *parts, "peak", f"fits {limit / GB:.0f} GB"]:
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for p in plans:
        table.add_row(p.strategy, *(f"{p.parts[k] / GB:.2f}" for k in parts), f"{p.peak / GB:.2f}",
                      "yes" if p.fits(limit) else "no")
    Console(width=max(110, Console().width)).print(table)
    typer.echo(f"device memory: {where}; the peak is weights + optimizer + gathered + loading + runtime + allocator + "
               "the largest of activations, gradients and evaluation; it fits when at most 90 % of the memory (see "
               f"`instructune.train.memory`); host allocator: {host_allocator()}")
    for p in plans if processes > 1 else plans[:1]:  # what to change, cheapest first, where it does not fit
        if advice := fit_advice(prep, train_set, p.strategy, processes, limit, gpu):
            typer.echo(f"{p.strategy}: {advice}")
    if "fsdp" in [p.strategy for p in plans] and not plans[-1].fits(limit):
        fits = next((n for n in range(processes + 1, 4097) if planner("fsdp", n).fits(limit)), None)
        typer.echo(f"fsdp fits from {fits} processes" if fits else "fsdp does not fit at any process count: "
                   "use LoRA, a shorter train.max_length or a smaller train.batch_size")
    from .train.auto import auto_settings_line  # the steps and time the epochs and lr (auto or set) make
    typer.echo(auto_settings_line(prep))


@app.command()
@handles_errors
def evaluate(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Evaluate the fine-tuned model of the run on the test split (writes finetuned.json)."""
    from .experiment import output_key, run_evaluate
    from .rundir import existing
    from .tasks import prepare

    cfg = _config(config, set_)
    prep = prepare(cfg)
    run_evaluate(prep, existing(cfg.run_dir(), output_key(cfg)))


@app.command()
@handles_errors
def report(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Write results.json and report.md from what the earlier stages wrote."""
    from .experiment import output_key, report as write_report
    from .rundir import existing

    cfg = _config(config, set_)
    _summary(write_report(existing(cfg.run_dir(), output_key(cfg)), cfg), cfg.run_dir())


@data_app.command("preview")
@handles_errors
def data_preview(config: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
                 n: int = typer.Option(2, min=0, max=1_000_000, help="pairs shown per task"),
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
    """Check the data before spending compute: split sizes, labels, supervised tokens, train/test leakage; for chat
    records (OpenAI's fine-tuning format) OpenAI's format checks, tokens per turn and what train.max_length cuts."""
    from collections import Counter

    from .data.lint import format_warnings, lint_pairs, lint_records
    from .runtime import WARNED
    from .tasks import data_stats, prepare, turn_stats

    cfg = _config(config, set_)
    before = len(WARNED)
    prep = prepare(cfg)  # bad input fails here, with file and line
    about_tasks = tuple(f"{t.name}:" for t in prep.tasks)
    said = [w for w in WARNED[before:] if not w.startswith(about_tasks)]  # preflight's: the config, the device
    stats = data_stats(prep)
    problems = 0
    for task in prep.tasks:
        st = stats[task.name]
        typer.secho(f"{task.name} ({task.template.type})", bold=True)
        typer.echo("  splits: " + ", ".join(f"{k} {v}" for k, v in st["sizes"].items()))
        if tasktypes.get(task.template.type).choices:
            for split in ("train", "test"):
                counts = Counter(p.completion for p in task.pairs.get(split, []))
                typer.echo(f"  {split} labels: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
        lengths = st["token_lengths"]
        typer.echo(f"  tokens per training pair: prompt max {max(lengths['prompt'])}, completion max "
                   f"{max(lengths['completion'])}; supervised share "
                   f"{sum(lengths['completion']) / (sum(lengths['prompt']) + sum(lengths['completion'])):.1%}")
        turns = turn_stats(task, cfg.train.max_length)  # chat records: tokens per turn, and what a cut takes
        if turns:
            typer.echo("  tokens per turn, most: " + ", ".join(f"{r} {n}" for r, n in turns["max_tokens"].items()) +
                       f"; {turns['trained_turns']} trained assistant turns in {turns['conversations']} conversations")
        lk = st["leakage"]
        leaked = lk["exact"] + lk["near"]
        problems += bool(leaked)
        typer.secho(f"  leakage: {lk['exact']} exact, {lk['near']} near-duplicate test inputs of {lk['test_size']}",
                    fg="yellow" if leaked else None)
        for ex in lk["examples"]:
            typer.echo(f"    test: {ex['test'][:80]!r}\n    train: {ex['train'][:80]!r} ({ex['kind']}, {ex['overlap']:.0%})")
        warnings = lint_records([r for rs in task.records.values() for r in rs]) + lint_pairs(
            task.template.type, task.template.fields, [p for ps in task.pairs.values() for p in ps])
        cut = st["truncated"]
        if cut["pairs"]:
            warnings.append({"kind": "truncated", "count": cut["pairs"], "message":
                             f"training pairs longer than train.max_length {cfg.train.max_length} (cut by up to "
                             f"{cut['max_cut']} tokens from the prompt's start)",
                             "examples": turns["cut"][:3] if turns else cut["examples"]})
        problems += bool(warnings)
        for line in format_warnings(task.name, warnings):
            typer.secho(line, fg="yellow")
    counts = ([f"{problems} task(s) with warnings"] if problems else []) + (
        [f"{len(said)} warning(s) about the config or the machine (above)"] if said else [])
    typer.echo("; ".join(counts) or "no warnings")


@app.command()
@handles_errors
def generate(text: str = typer.Argument(..., help="the input: plain text for the task's main field, or a JSON record"),
             model: Path = typer.Option(..., "--model", help="a run folder or its model/ folder"),
             task: Optional[str] = typer.Option(None, help="task name (needed when the model learned several)"),
             max_new_tokens: Optional[int] = typer.Option(None, min=1, max=MAX_TOKENS, help="longest answer "
                                                          "(default: the task's)")):
    """Answer one input with a fine-tuned model, rendering the prompt with the template it was trained with."""
    from .evaluate.generate import check_prompt_fits, generate as run_generate
    from .models import load_finetuned
    from .predict import record_from_text

    model_obj, tokenizer, manifest = load_finetuned(model)
    template = manifest.task_template(task)
    fmt = manifest.prompt_format(tokenizer, template.separator)
    pair = template.inference_pair(record_from_text(text, template))
    prompt = fmt.pair_prompt(pair)
    new_tokens = max_new_tokens or template.max_new_tokens
    check_prompt_fits(model_obj, fmt, prompt, new_tokens, "TEXT")  # refused with the numbers, never fed past the context
    typer.echo(run_generate(model_obj, fmt, [prompt], new_tokens)[0])


@app.command()
@handles_errors
def predict(model: Path = typer.Argument(..., help="a run folder or its model/ folder"),
            input: Path = typer.Option(..., "--input", help="records to label: JSONL, JSON, CSV or Parquet, with the "
                                       "fields the task's template reads (the same field names as in training)"),
            output: Optional[Path] = typer.Option(None, help="a .jsonl or .csv file (default: INPUT.predictions.jsonl)"),
            task: Optional[str] = typer.Option(None, help="task name (needed when the model learned several)"),
            batch_size: int = typer.Option(32, min=1, max=65_536, help="prompts per batch"),
            max_new_tokens: Optional[int] = typer.Option(None, min=1, max=MAX_TOKENS, help="default: the task's"),
            overwrite: bool = typer.Option(False, help="replace an existing output file")):
    """Predict for every record of a file: one output record per input, in order, with the input's fields and
    `prediction` (classification: also `label` and its `probability` among the choices, by likelihood)."""
    from .predict import predict_file

    out, n = predict_file(model, input, output, task, batch_size, max_new_tokens, overwrite)
    typer.echo(f"{n} predictions written to {out}")


@app.command()
@handles_errors
def chat(model: Path = typer.Argument(..., help="a run folder or its model/ folder"),
         task: Optional[str] = typer.Option(None, help="render each message through this task's training prompt "
                                            "(no memory across turns) instead of free multi-turn chat"),
         max_new_tokens: int = typer.Option(256, min=1, max=MAX_TOKENS, help="longest reply")):
    """Chat with a fine-tuned model in the terminal (its chat template, multi-turn, streamed).
    /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply."""
    from .chat import chat as run_chat

    run_chat(model, task, max_new_tokens, write=lambda *a, **k: print(*a, **k))


@app.command()
@handles_errors
def serve(run: Path = typer.Argument(..., help="a run folder or its model/ folder"),
          task: Optional[str] = typer.Option(None, help="wrap messages sent to the run's own model name in this task's "
                                             "training prompt too (RUN/TASK always does)"),
          host: str = typer.Option("127.0.0.1", help="the address to listen on; anything but loopback (127.0.0.1, "
                                   "::1, localhost) needs --api-key"),
          port: int = typer.Option(8000, min=1, max=65535, help="the port to listen on"),
          api_key: Optional[str] = typer.Option(None, envvar="INSTRUCTUNE_API_KEY", help="answer only requests "
                                                "with 'Authorization: Bearer KEY' (the openai client's api_key)"),
          continuous_batching: bool = typer.Option(True, help="batch concurrent requests (transformers' continuous "
                                                   "batching); --no-continuous-batching answers one at a time")):
    """Serve a fine-tuned run behind an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions,
    streaming too), on transformers' serving engine. Model names: RUN (its chat template, as trained) and RUN/TASK
    (the user's message in that task's training prompt: send "The battery died after a day.", get "negative").
    Answers are greedy unless a request sets temperature > 0. Example, from Python:
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(model="RUN/TASK", ...)"""
    try:
        from .serve import serve as run_server
    except ImportError as e:
        raise InstructuneError(f"serving needs {e.name or 'its extra'}: pip install 'instructune[serve]'", "serve")
    run_server(run, task, host, port, api_key, continuous_batching)


@app.command()
@handles_errors
def export(run: Path = typer.Argument(..., help="a run folder (or its model/ folder) with a fine-tuned model"),
           format: str = typer.Option(..., "--format", help="merged: a standalone transformers folder (the adapter "
                                      "merged into the full-precision base); gguf: one .gguf file for llama.cpp; "
                                      "ollama: the .gguf plus a Modelfile"),
           dtype: Optional[str] = typer.Option(None, help="merged: float32 (default), bfloat16, float16; "
                                               "gguf/ollama: f16 (default), q8_0, f32, or the K-quants q4_K_M, "
                                               "q5_K_M, q6_K (made by llama.cpp's quantizer: needs "
                                               "`pip install llama-cpp-python`)"),
           out: Optional[Path] = typer.Option(None, help="the export folder (default RUN/export/FORMAT); an existing "
                                              "folder must be one an export made"),
           task: Optional[str] = typer.Option(None, help="ollama: wrap the user's text in this task's training prompt"),
           check: Optional[bool] = typer.Option(None, "--check/--no-check", help="compare the export's greedy "
                                                "answers with the evaluated model's on the run's test prompts "
                                                "(default: on when the test split has at most 200 prompts)"),
           check_limit: int = typer.Option(200, min=1, max=1_000_000, help="test prompts per task the check uses "
                                           "at most")):
    """Export the fine-tuned model with its training template: merged (transformers), GGUF (llama.cpp) or Ollama.
    The parity check's figures are printed and written to parity.json in the export folder."""
    from .export import export_run

    folder, report = export_run(run, format, dtype, out, task, check, check_limit)
    typer.echo(f"exported to {folder}")
    for name, r in (report or {}).items():
        typer.echo(f"  {name}: {100 * r['share_identical']:.1f} % of greedy answers identical; {r['metric']} "
                   f"{r['reference']:.4f} (evaluated) vs {r['exported']:.4f} (export), {r['difference_points']:+.2f} points")


@app.command()
@handles_errors
def templates(task_type: Optional[str] = typer.Argument(None, help=", ".join(tasktypes.names()))):
    """List the template library (use a name as a task's `template`)."""
    from .prompts.library import LIBRARY

    if task_type is not None and task_type not in tasktypes.names():  # refused, not listed as nothing
        raise InstructuneError(f"unknown task type {task_type!r}; known task types: {', '.join(tasktypes.names())}",
                               "TASK_TYPE")
    for name, t in LIBRARY.items():
        if task_type and not name.startswith(task_type + "/"):
            continue
        default = " (default)" if name in {tasktypes.get(t).default_template for t in tasktypes.names()} else ""
        typer.secho(f"{name}{default}", bold=True)
        typer.echo(f"  prompt:     {t.prompt!r}\n  separator:  {t.separator!r}\n  completion: {t.completion!r}")


@app.command("demo-data")
@handles_errors
def demo_data(out: Path = typer.Argument(Path("data/demo"), help="the folder to write (new, empty, or one "
                                         "demo-data wrote)"),
              seed: int = typer.Option(0, min=0, max=2**32 - 1, help="the generator's seed")):
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


def main() -> None:
    """The `instructune` command; exits with the documented status (EXIT_HELP)."""
    sys.exit(_status())


def _status() -> int:
    """Run the command line; its exit status. Click's usage errors (an unknown option, a value out of its range, a
    missing argument) become one line naming the option, status 2, like every other bad input (typer draws a box)."""
    try:  # the click typer runs on: typer >= 0.29 vendors its own
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click
    try:
        code = app(standalone_mode=False, prog_name="instructune")
    except click.NoArgsIsHelpError as e:  # a group called alone: its help (typer's rich help printed itself)
        if e.format_message().strip():
            typer.echo(e.format_message())
        return 2
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx else "instructune"
        typer.secho(f"error: {where}: {e.format_message()} (see `{where} --help`)", fg=typer.colors.RED, err=True)
        return 2
    except click.ClickException as e:
        typer.secho(f"error: {e.format_message()}", fg=typer.colors.RED, err=True)
        return e.exit_code
    except typer.Abort:  # click's Abort, which typer >= 0.29 keeps in typer.exceptions, not in its vendored click
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0  # typer.Exit's status; a command itself returns None


def command() -> None:
    """The installed `instructune` (and `python -m instructune.cli`): under tcmalloc where this machine has it (see
    `instructune.allocator`), then `main`."""
    from .allocator import preload

    preload()
    main()


if __name__ == "__main__":
    command()
