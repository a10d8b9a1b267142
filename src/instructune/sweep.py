"""`instructune sweep`: the training settings chosen on the validation split by an Optuna search (TPE, seeded; the
median pruner on the validation metric), within a wall-clock budget; then the experiment continues as `run` does,
with the best trial's model as the run's model (baselines, evaluation, report).

Trial 0 runs the config's own settings. Every trial trains on the training split and scores the tasks' primary
metric by generation on the validation split (the mean over tasks, each 0..1, or `sweep.task`'s alone) at
`sweep.evaluations` points of its training: the intermediate values the pruner compares. Trials see the tasks
without their test split; the test split is first read after the choice is written (sweep/sweep.json).

`runs/<name>/sweep/` holds the study (study.db, SQLite: `--resume` continues a killed sweep, and a finished trial is
never run again; the one a kill interrupted runs again from its start), one folder per trial (trial.json: settings,
validation metric per evaluation, wall time, tokens; train_log.jsonl; model/ while it is the best or the default),
sweep.json once the choice is made, and default/ (the default settings' model evaluated on the test split, for the
paired comparison in the report)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

from . import rundir, tasktypes
from .config import ExperimentConfig, ModelConfig, SearchRange, with_values
from .errors import InstructuneError, TrainingDiverged
from .evaluate.score import validation_scorer
from .experiment import (check_fits, check_run_folder, report, run_baseline, run_evaluate, run_train, start_run,
                         train_inputs)
from .io import read_jsonl, write_json
from .manifest import Manifest
from .models import resolve_model
from .prompts.library import LIBRARY
from .runtime import distributed, say
from .tasks import Prepared, data_fingerprint, prepare
from .train.auto import total_steps

FOLDER = "sweep"
OWN_TEMPLATE = "(config)"  # a template choice: the task's own template as the config gives it
FINISHED = ("complete", "pruned", "diverged")  # outcomes that count as trials run
RETRIED = (None, "stopped by the budget")  # outcomes (None: killed) whose trial runs again on --resume
SKIPS = 3  # draws in a row that would not fit in the budget's rest before the search ends


IMPORTANCE_TRIALS = 5  # complete trials before the settings' importance is worth stating


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise InstructuneError("`instructune sweep` needs Optuna: pip install 'instructune[sweep]' (make setup "
                               "installs it)", "sweep") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def run_sweep(cfg: ExperimentConfig, trials: int | None = None, budget: float | None = None,
              resume: bool = False) -> dict:
    """Search, choose on validation, then baselines → the chosen model → evaluation → report, as `run`."""
    require_optuna()
    if distributed()[1] > 1:
        raise InstructuneError("a sweep runs its trials one after another in one process: start it without a "
                               "launcher", "sweep")
    check_run_folder(cfg)
    prep = prepare(cfg)
    check_fits(prep)  # the config's own settings (trial 0) must fit, as for `run`
    for i, task in enumerate(prep.tasks):
        if not task.pairs.get("validation"):
            raise InstructuneError(f"task {task.name!r} has no validation split, and a sweep chooses on it: set "
                                   "data.validation_size above 0 or give data.validation", f"tasks.{i}.data")
    space = search_space(cfg, prep)
    run_dir = start_run(cfg, prep)
    try:
        search = Search.open(cfg, prep, space, run_dir / FOLDER, resume,
                             budget if budget is not None else cfg.sweep.budget_seconds)
        search.run(trials or cfg.sweep.trials)
        return continue_as_run(search, run_dir)
    finally:
        rundir.release()


# -- the search space --------------------------------------------------------------------------------------------
def search_space(cfg: ExperimentConfig, prep: Prepared) -> dict[str, SearchRange]:
    """`sweep.space`, or by default: train.lr log-uniform from a tenth to four times the config's, train.epochs from
    half to three times the config's and, for adapters, train.lora.r and alpha among 8..64; `choices: all` for a
    template is every library phrasing of the task's type. Each key's own value (trial 0's) must be in its space."""
    tc = cfg.train
    if cfg.sweep.space:
        space = {k: v.model_copy() for k, v in cfg.sweep.space.items()}
    else:
        space = {"train.lr": SearchRange(low=tc.learning_rate / 10, high=tc.learning_rate * 4, log=True),
                 "train.epochs": SearchRange(low=tc.epoch_count / 2, high=tc.epoch_count * 3)}
        if tc.method != "full":
            space["train.lora.r"] = SearchRange(choices=sorted({8, 16, 32, tc.lora.r}))
            space["train.lora.alpha"] = SearchRange(choices=sorted({16, 32, 64, tc.lora.alpha}))
    for key, rng in space.items():
        where = f"sweep.space.{key}"
        if key.startswith("tasks.") and key.endswith(".template"):
            rng.choices = template_choices(cfg, key, rng.choices, where)
        if key == "model.name":
            for name in rng.choices or []:
                resolve_model(ModelConfig(**{**cfg.model.model_dump(), "name": str(name)}), where)
        own = own_value(cfg, key)
        inside = own in rng.choices if rng.choices is not None else rng.low <= own <= rng.high
        if not inside:
            raise InstructuneError(f"trial 0 runs the config's own settings, and {key} = {own!r} is outside this "
                                   "space: widen it or change the config", where)
    return space


def template_choices(cfg: ExperimentConfig, key: str, choices, where: str) -> list[str]:
    """The template names a task's trials may use: library phrasings of its type (or `(config)`, its own)."""
    task = cfg.tasks[int(key.split(".")[1])]
    library = [n for n in LIBRARY if n.startswith(f"{task.type}/")]
    wanted = library if choices == "all" else [str(c) for c in choices]
    for name in wanted:
        if name != OWN_TEMPLATE and name not in library:
            raise InstructuneError(f"{name!r} is not a {task.type} template of the library (instructune templates "
                                   f"{task.type}): {', '.join(library)}", where)
    own = own_value(cfg, key)
    return wanted if own in wanted else [own, *wanted]


def own_value(cfg: ExperimentConfig, key: str):
    """The config's value of a searched key, as a trial parameter: the learning rate and epochs `auto` or the
    method's default came to, a task's template by its library name (or `(config)`)."""
    if key == "train.lr":
        return cfg.train.learning_rate
    if key == "train.epochs":
        return cfg.train.epoch_count
    value = _at(cfg.model_dump(mode="json"), key)
    if key.startswith("tasks.") and key.endswith(".template"):
        task = cfg.tasks[int(key.split(".")[1])]
        return value if isinstance(value, str) else (tasktypes.get(task.type).default_template if value is None
                                                     else OWN_TEMPLATE)
    return value


def _at(raw, key: str):
    for part in key.split("."):
        raw = raw[int(part)] if isinstance(raw, list) else raw[part]
    return raw


def suggest(trial, space: dict[str, SearchRange]) -> dict:
    """The trial's value of every searched key (an enqueued trial gets the values it was enqueued with)."""
    params = {}
    for key, rng in space.items():
        if rng.choices is not None:
            params[key] = trial.suggest_categorical(key, rng.choices)
        elif all(float(x).is_integer() for x in (rng.low, rng.high, rng.step or 1)) and key.split(".")[-1] in \
                ("r", "alpha", "batch_size", "grad_accum", "max_length"):
            params[key] = trial.suggest_int(key, int(rng.low), int(rng.high), step=int(rng.step or 1), log=rng.log)
        else:
            params[key] = trial.suggest_float(key, rng.low, rng.high, step=rng.step, log=rng.log)
    return params


# -- the search --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Trial:
    """What one trial trains: its config (the sweep's settings applied), the prepared tasks with and without the
    test split, and its optimizer steps."""

    cfg: ExperimentConfig
    prep: Prepared  # with the test split: for after the choice
    search_prep: Prepared  # without it: what the trial trains and validates on
    steps: int


class OutOfBudget(Exception):
    """The budget ran out during a trial (checked at each of its evaluations)."""


@dataclasses.dataclass
class Search:
    cfg: ExperimentConfig
    prep: Prepared
    space: dict
    folder: Path
    study: object
    budget: float | None
    started: float = 0.0
    spent_before: float = 0.0
    preps: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, cfg, prep, space, folder: Path, resume: bool, budget: float | None) -> "Search":
        """The study in `folder`/study.db: a new one (a previous sweep's folder is removed), or with `resume` the one
        there, its interrupted trials queued to run again."""
        optuna = require_optuna()
        if resume and not (folder / "study.db").is_file():
            say("no sweep to resume in this run folder: starting one")
            resume = False
        if not resume and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            storage=f"sqlite:///{(folder / 'study.db').resolve()}", study_name=cfg.name, direction="maximize",
            load_if_exists=resume, sampler=optuna.samplers.TPESampler(seed=cfg.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.sweep.startup_trials, n_warmup_steps=0))
        search = cls(cfg, prep, space, folder, study, budget, time.perf_counter(),
                     study.user_attrs.get("search_seconds", 0.0))
        if not study.trials:
            study.enqueue_trial({k: own_value(cfg, k) for k in space}, user_attrs={"default": True})
        else:
            search.requeue()
        return search

    def requeue(self) -> None:
        """Trials a kill or the budget stopped run again (from their start), once, before any new one."""
        from optuna.trial import TrialState

        retried = {t.user_attrs.get("retry_of") for t in self.study.trials}
        for t in self.study.trials:
            if t.state == TrialState.RUNNING:  # this process holds the run folder's lock: its process is gone
                self.study.tell(t.number, state=TrialState.FAIL)
                t = self.study.trials[t.number]
            if t.state == TrialState.FAIL and t.user_attrs.get("outcome") in RETRIED and t.number not in retried:
                default = bool(t.user_attrs.get("default"))  # (killed before its values were drawn: no params yet)
                params = {k: own_value(self.cfg, k) for k in self.space} if default else t.params
                self.study.enqueue_trial(params, user_attrs={"default": default, "retry_of": t.number})
                say(f"sweep: trial {t.number} did not finish; it runs again")

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def finished(self) -> list:
        return [t for t in self.study.trials if t.user_attrs.get("outcome") in FINISHED]

    def run(self, n_trials: int) -> None:
        """Trials until `n_trials` have finished, or the budget would be passed: a trial whose estimated time (from
        the finished trials' seconds per step) exceeds what is left is not started (after SKIPS such draws in a
        row, the search ends)."""
        from optuna.trial import TrialState

        skipped = 0
        while len(self.finished()) < n_trials and skipped < SKIPS:
            left = None if self.budget is None else self.budget - self.spent()
            if left is not None and left <= 0:
                say(f"sweep: the budget of {self.budget:.0f} s is spent")
                return
            trial = self.study.ask()
            setup = self.setup(suggest(trial, self.space))
            estimate = self.estimate(setup)
            if left is not None and estimate is not None and estimate > left:
                trial.set_user_attr("outcome", f"not run: estimated {estimate:.0f} s, {left:.0f} s of the budget left")
                self.study.tell(trial, state=TrialState.FAIL)
                say(f"sweep: trial {trial.number} would need about {estimate:.0f} s, {left:.0f} s are left: not run")
                skipped += 1
                continue
            skipped = 0
            self.run_trial(trial, setup)

    def setup(self, params: dict) -> Trial:
        """A trial's config: the config with the trial's values, validated by the metric at `sweep.evaluations`
        points (the last at the end), and its prepared tasks (prepared again only for another model or template)."""
        values = {"train.epochs": self.cfg.train.epoch_count, "train.lr": self.cfg.train.learning_rate,
                  "train.eval_metric": True, "train.metric_samples": self.cfg.sweep.metric_samples}
        for key, value in params.items():
            values[key] = self.cfg.tasks[int(key.split(".")[1])].template if value == OWN_TEMPLATE else value
        cfg = with_values(self.cfg, values)
        prep = self.prepared(cfg)
        n = sum(len(t.pairs.get("train", [])) for t in prep.tasks)
        steps = total_steps(n, cfg.train, cfg.train.epoch_count)
        cfg = with_values(cfg, {"train.eval_every": max(1, math.ceil(steps / self.cfg.sweep.evaluations))})
        return Trial(cfg, dataclasses.replace(prep, cfg=cfg), without_test(prep, cfg), steps)

    def prepared(self, cfg: ExperimentConfig) -> Prepared:
        key = json.dumps({k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("train", "sweep")})
        base = json.dumps({k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in ("train", "sweep")})
        if key == base:
            return self.prep
        if key not in self.preps:
            self.preps[key] = prepare(cfg)
        return self.preps[key]

    def estimate(self, setup: Trial) -> float | None:
        """Seconds the trial would take: the slowest finished trial's seconds per step (of the same model, when one
        finished) times its steps; None before any trial has finished."""
        done = [t for t in self.finished() if t.user_attrs.get("outcome") == "complete"]
        same = [t for t in done if t.user_attrs.get("model") == setup.cfg.model.name] or done
        rates = [t.user_attrs["seconds"] / max(t.user_attrs["steps"], 1) for t in same]
        return max(rates) * setup.steps if rates else None

    def trial_dir(self, number: int) -> Path:
        return self.folder / f"trial-{number:03d}"

    def run_trial(self, trial, setup: Trial) -> None:
        """Train and score one trial; record it (trial.json, the study's user attributes) and tell the study."""
        optuna = require_optuna()
        from optuna.trial import TrialState

        folder = self.trial_dir(trial.number)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        default = bool(trial.user_attrs.get("default"))
        record = {"number": trial.number, "params": trial.params, "default": default, "steps": setup.steps,
                  "eval_every": setup.cfg.train.eval_every, "model": setup.cfg.model.name, "evaluations": [],
                  "started": time.perf_counter()}
        say(f"sweep: trial {trial.number}{' (the config' + chr(39) + 's own settings)' if default else ''}: "
            + ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items()))
        state, value = TrialState.COMPLETE, None
        try:
            run_train(setup.search_prep, folder, scorer=self.reporting(trial, setup, record, default))
            values = [e["value"] for e in record["evaluations"]]
            value = max(values) if setup.cfg.train.keep_best else values[-1]
            record["outcome"] = "complete"
        except optuna.TrialPruned:
            state, record["outcome"] = TrialState.PRUNED, "pruned"
        except TrainingDiverged:
            state, record["outcome"] = TrialState.FAIL, "diverged"
        except OutOfBudget:
            state, record["outcome"] = TrialState.FAIL, "stopped by the budget"
        self.record(trial, folder, record, value)
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        self.keep_models()
        say(f"sweep: trial {trial.number} {record['outcome']}"
            + (f", validation {value:.4f}" if value is not None else "") + f" ({record['seconds']:.0f} s; "
            f"{self.spent():.0f} s of the search{f' budget {self.budget:.0f} s' if self.budget else ''})")

    def reporting(self, trial, setup: Trial, record: dict, default: bool):
        """The trial's validation scorer: it reports each value to the study (the pruner's input), records it, and
        stops the trial when the pruner says so (never the default's) or the budget is spent."""
        optuna = require_optuna()
        tasks = [t for t in setup.search_prep.tasks if self.cfg.sweep.task in (None, t.name)]
        scorer = validation_scorer([(t.template, t.fmt, t.pairs["validation"][: self.cfg.sweep.metric_samples])
                                    for t in tasks], setup.cfg.evaluate.batch_size, setup.cfg.train.bf16)

        def score(model) -> float:
            began = time.perf_counter()
            value = float(scorer(model))
            now = time.perf_counter()
            record["evaluations"].append({"index": len(record["evaluations"]) + 1, "value": value,
                                          "seconds": round(now - record["started"], 3),
                                          "evaluation_seconds": round(now - began, 3)})
            trial.report(value, len(record["evaluations"]))
            trial.set_user_attr("evaluations", record["evaluations"])
            self.study.set_user_attr("search_seconds", round(self.spent(), 3))
            if self.budget is not None and self.spent() > self.budget:
                raise OutOfBudget
            if not default and trial.should_prune():
                raise optuna.TrialPruned
            return value
        return score

    def record(self, trial, folder: Path, record: dict, value: float | None) -> None:
        record["seconds"] = round(time.perf_counter() - record.pop("started"), 3)
        record["value"] = value
        log = read_jsonl(folder / "train_log.jsonl") if (folder / "train_log.jsonl").is_file() else []
        record["tokens"] = log[-1]["tokens"] if log else 0
        record["steps_run"] = log[-1]["step"] if log else 0
        for key in ("outcome", "seconds", "tokens", "steps", "model", "evaluations"):
            trial.set_user_attr(key, record[key])
        self.study.set_user_attr("search_seconds", round(self.spent(), 3))
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
        write_json(folder / "trial.json", record)

    def keep_models(self) -> None:
        """Only the default's model and the best one so far stay on disk (the others are never used again)."""
        keep = {t.number for t in self.study.trials if t.user_attrs.get("default")}
        if (best := self.best()) is not None:
            keep.add(best.number)
        for t in self.study.trials:
            if t.number not in keep:
                shutil.rmtree(self.trial_dir(t.number) / "model", ignore_errors=True)

    def best(self):
        """The finished trial with the highest validation value (the earliest of equals: the default wins ties)."""
        done = [t for t in self.study.trials if t.user_attrs.get("outcome") == "complete"]
        return max(done, key=lambda t: (t.value, -t.number)) if done else None

    def default(self):
        done = [t for t in self.study.trials if t.user_attrs.get("default") and t.user_attrs.get("outcome") == "complete"]
        return done[0] if done else None


def without_test(prep: Prepared, cfg: ExperimentConfig) -> Prepared:
    """The prepared tasks as a trial sees them: every split but the test split (nothing in a trial can read it)."""
    def strip(task):
        return dataclasses.replace(task, pairs={k: v for k, v in task.pairs.items() if k != "test"},
                                   records={k: v for k, v in task.records.items() if k != "test"})
    return dataclasses.replace(prep, cfg=cfg, tasks=[strip(t) for t in prep.tasks],
                               held_out=[strip(t) for t in prep.held_out])


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# -- after the choice: the experiment as `run` does it ------------------------------------------------------------
def continue_as_run(search: Search, run_dir: Path) -> dict:
    """Write the choice (sweep.json), then, reading the test split for the first time: the baselines, the chosen
    model as the run's model, its evaluation, the default settings' model on the same test split, the report."""
    chosen, default = search.best(), search.default()
    if default is None:
        what = next((t.user_attrs.get("outcome") for t in search.study.trials if t.user_attrs.get("default")), None)
        raise InstructuneError(f"the trial with the config's own settings did not finish ({what or 'not run'}), so "
                               "there is nothing to compare the search with: rerun with --resume (and a larger "
                               "--budget)" if what != "diverged" else "the config's own settings diverged in trial 0: "
                               "lower train.lr and run the sweep again", "--budget" if what != "diverged" else "train.lr")
    write_json(search.folder / "sweep.json", sweep_record(search, chosen, default))
    final = search.setup(chosen.params)
    say(f"sweep: chose trial {chosen.number} (validation {chosen.value:.4f}; the config's own settings "
        f"{default.value:.4f}); now the test split")
    start_run(final.cfg, final.prep)
    if final.cfg.baseline.enabled:
        run_baseline(final.prep, run_dir)
    adopt(search.trial_dir(chosen.number), run_dir, final.prep)
    run_evaluate(final.prep, run_dir)
    if default.number != chosen.number:
        own = search.setup(default.params)
        adopt(search.trial_dir(default.number), search.folder / "default", own.prep)
        run_evaluate(own.prep, search.folder / "default")
    return report(run_dir, final.cfg)


def adopt(trial_dir: Path, target: Path, prep: Prepared) -> None:
    """A trial's model as the model of a run folder's train stage (with the data fingerprint of every split)."""
    rundir.begin(target, "train", train_inputs(prep), keep=(FOLDER,))
    shutil.copytree(trial_dir / "model", target / "model")
    shutil.copy2(trial_dir / "train_log.jsonl", target / "train_log.jsonl")
    manifest = Manifest.read(target / "model")
    manifest.model_copy(update={"data_fingerprint": data_fingerprint(prep.tasks)}).write(target / "model")
    rundir.finish(target, "train")


def sweep_record(search: Search, chosen, default) -> dict:
    """sweep.json: every trial (settings, outcome, validation per evaluation, seconds, tokens), the choice, the
    default, the search's time and budget, and the settings' importance (fANOVA over the finished trials)."""
    trials = [{"number": t.number, "params": t.params, "outcome": t.user_attrs.get("outcome", "interrupted"),
               "value": t.value if t.user_attrs.get("outcome") == "complete" else None,
               "default": bool(t.user_attrs.get("default")), "retry_of": t.user_attrs.get("retry_of"),
               **{k: t.user_attrs.get(k) for k in ("evaluations", "seconds", "tokens", "steps")}}
              for t in search.study.trials]
    space = {k: v.model_dump(exclude_none=True) for k, v in search.space.items()}
    return {"objective": (f"{search.cfg.sweep.task}: primary metric" if search.cfg.sweep.task else
                          "mean of the tasks' primary metrics (each 0..1)") + " by generation on the first "
                         f"{search.cfg.sweep.metric_samples} validation examples" + ("" if search.cfg.sweep.task else
                                                                                    " per task"),
            "sampler": f"TPE (seed {search.cfg.seed})", "pruner": f"median, after {search.cfg.sweep.startup_trials} "
            f"finished trials, at {search.cfg.sweep.evaluations} evaluations per trial", "space": space,
            "trials": trials, "chosen": chosen.number, "default": default.number,
            "search_seconds": round(search.spent(), 1), "budget_seconds": search.budget,
            "importance": importance(search.study, search.cfg.seed)}


def importance(study, seed: int) -> dict:
    """Each searched setting's share of the validation metric's variance (Optuna's fANOVA); {} with fewer than
    IMPORTANCE_TRIALS complete trials, where a forest fitted to two or three points would rank noise."""
    optuna = require_optuna()
    from optuna.trial import TrialState

    if sum(t.state == TrialState.COMPLETE for t in study.trials) < IMPORTANCE_TRIALS:
        return {}
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    except (ValueError, RuntimeError):
        return {}
    return {k: round(float(v), 4) for k, v in found.items()}
