"""`instructune sweep` on a tiny random model: trials recorded, pruning, a SIGKILLed sweep resumed without running a
finished trial again, the budget kept, the test split unread until the choice, trial 0 the config's own settings;
and the `auto` rules for epochs and learning rate."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from instructune.cli import app

optuna = pytest.importorskip("optuna", reason="`instructune sweep` needs the sweep extra (make setup installs it)")


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def sweep_config(tmp_path, model, lr, space, **sweep):
    """A translation task (chrF moves after a few steps of lr 1e-2, and not at all at 1e-7: a trial far from the
    default is measurably worse at its first evaluation), 8 optimizer steps per trial, 2 evaluations."""
    cfg = tiny_config(tmp_path, model, ("translation",), n_train=16, method="full", lr=lr, epochs=2)
    cfg["sweep"] = {"evaluations": 2, "metric_samples": 4, "startup_trials": 1, "space": space, **sweep}
    return cfg


def study(run):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{run / 'sweep' / 'study.db'}")


class RecordedReads(list):
    """A split that records every read of its items, and whether the sweep had written its choice by then."""

    def __init__(self, items, choice_file, reads):
        super().__init__(items)
        self.choice_file, self.reads = choice_file, reads

    def _read(self):
        self.reads.append(self.choice_file.exists())

    def __iter__(self):
        self._read()
        return super().__iter__()

    def __getitem__(self, i):
        self._read()
        return super().__getitem__(i)


def test_trials_recorded_pruned_and_the_test_split_read_only_after_the_choice(tmp_path, tiny_model, monkeypatch):
    import instructune.sweep as sweep_module

    run, reads, real_prepare = tmp_path / "run", [], sweep_module.prepare

    def prepare_recording_test_reads(cfg):
        prep = real_prepare(cfg)
        for task in prep.tasks + prep.held_out:
            for split in (task.pairs, task.records):
                split["test"] = RecordedReads(split["test"], run / "sweep" / "sweep.json", reads)
        return prep

    monkeypatch.setattr(sweep_module, "prepare", prepare_recording_test_reads)
    cfg = sweep_config(tmp_path, tiny_model, 1e-2, {"train.lr": {"low": 1e-7, "high": 1e-2, "log": True}})
    code, out = cli("sweep", write_config(tmp_path, cfg), "--trials", 3)
    assert code == 0, out

    assert reads and all(reads), f"the test split was read before the choice ({reads.count(False)} reads)"
    record = json.loads((run / "sweep" / "sweep.json").read_text())
    trials = record["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and record["default"] == 0
    assert trials[0]["default"] and trials[0]["params"] == {"train.lr": 0.01}
    for t in trials:  # params, validation per evaluation, wall time and tokens, in sweep.json and in trial.json
        assert t["evaluations"] and all(0 <= e["value"] <= 1 for e in t["evaluations"]) and t["seconds"] > 0
        assert t["tokens"] > 0 and (run / "sweep" / f"trial-{t['number']:03d}" / "trial.json").is_file()
    # trial 0 trained with the config's own settings (only the sweep's validation schedule added)
    trained = json.loads((run / "sweep" / "trial-000" / "model" / "instructune.json").read_text())["config"]["train"]
    own = {k: v for k, v in cfg["train"].items()}
    assert {k: trained[k] for k in own} == own
    assert trained["eval_metric"] and trained["eval_every"] == 4 and trained["metric_samples"] == 4

    # pruning: a trial whose first validation is below the median of the finished ones (trial 0's) stops there
    states = {t.number: t for t in study(run).trials}
    pruned = [t for t in trials if t["outcome"] == "pruned"]
    assert pruned, [(t["params"], t["evaluations"]) for t in trials]
    for t in pruned:
        assert states[t["number"]].state == optuna.trial.TrialState.PRUNED
        assert len(t["evaluations"]) == 1 and t["evaluations"][0]["value"] < trials[0]["evaluations"][0]["value"]

    results = json.loads((run / "results.json").read_text())
    assert results["sweep"]["chosen"] == record["chosen"] and "tiny_translation" in results["sweep"]["test"]
    assert "Settings search" in (run / "report.md").read_text()
    assert 'id="chart-sweep"' in (run / "report.html").read_text()
    saved = yaml_load(run / "config.yaml")
    assert saved["train"]["lr"] == trials[record["chosen"]]["params"]["train.lr"]  # the run's config: the choice


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


# The real CLI with save_checkpoint patched (as conftest's BLOCK_AFTER_CHECKPOINT): the checkpoint of step STOP of the
# second trial that reaches it is written whole, then a marker is dropped and the process blocks until killed.
BLOCK_IN_SECOND_TRIAL = """
import sys, time
from pathlib import Path

import instructune.train.checkpoint as checkpoint

STOP, marker, config = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
real_save, seen = checkpoint.save_checkpoint, []


def save_then_block(folder, named, optimizer, scheduler, state, *args, **kwargs):
    real_save(folder, named, optimizer, scheduler, state, *args, **kwargs)
    if state["step"] == STOP:
        seen.append(folder)
        if len(seen) == 2:
            marker.write_text(str(folder))
            time.sleep(3600)


checkpoint.save_checkpoint = save_then_block
from instructune.cli import main

sys.argv = ["instructune", "sweep", config, "--trials", "2"]
main()
"""


def test_sigkilled_sweep_resumes_without_repeating_a_finished_trial(tmp_path, tiny_model):
    """Killed in trial 1: on --resume trial 0 stays as it was, trial 1 runs again (as trial 2); the search chose
    other settings than the config's, so the report compares the two on the test split."""
    cfg = sweep_config(tmp_path, tiny_model, 1e-7, {"train.lr": {"choices": [1e-7, 0.01, 0.02, 0.03]}},
                       startup_trials=5)  # (TPE, seed 0, draws 0.01 for trial 1)
    cfg["train"]["save_every"] = 1
    cfg["baseline"] = {"enabled": False}
    config, run = write_config(tmp_path, cfg), tmp_path / "run"
    marker, wrapper = tmp_path / "blocked", tmp_path / "block.py"
    wrapper.write_text(BLOCK_IN_SECOND_TRIAL)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "cut.stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, str(wrapper), "2", str(marker), str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 180
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"never blocked (exit {proc.poll()}): {(tmp_path / 'cut.stderr').read_text()[-2000:]}"
        assert "trial-001" in marker.read_text()
        first = (run / "sweep" / "trial-000" / "trial.json").read_bytes()
        assert json.loads(first)["outcome"] == "complete"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "sweep" / "sweep.json").exists()
    killed_params = study(run).trials[1].params

    code, out = cli("sweep", config, "--trials", 2, "--resume")
    assert code == 0, out
    trials = study(run).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == killed_params
    assert (run / "sweep" / "trial-000" / "trial.json").read_bytes() == first  # trial 0 was not run again
    assert sum(t.user_attrs.get("default", False) for t in trials) == 1
    record = json.loads((run / "sweep" / "sweep.json").read_text())
    assert record["chosen"] == 2 and record["default"] == 0, record["trials"]
    change = json.loads((run / "results.json").read_text())["sweep"]["test"]["tiny_translation"]["change"]
    assert {"points", "ci_low", "ci_high", "p_value"} <= set(change)
    assert (run / "sweep" / "default" / "finetuned.json").is_file()


def test_the_budget_is_never_passed_by_more_than_one_evaluation(tmp_path, tiny_model):
    cfg = sweep_config(tmp_path, tiny_model, 1e-2, {"train.lr": {"low": 1e-3, "high": 2e-2, "log": True}})
    cfg["baseline"] = {"enabled": False}
    code, out = cli("sweep", write_config(tmp_path, cfg), "--trials", 50, "--budget", "3s")
    trials = study(tmp_path / "run").trials
    spent = study(tmp_path / "run").user_attrs["search_seconds"]
    steps = [[0] + [e["seconds"] for e in t.user_attrs.get("evaluations", [])] for t in trials]
    longest = max(b - a for s in steps for a, b in zip(s, s[1:]))  # one evaluation (and the steps before it)
    assert spent <= 3 + longest + 1.0, (spent, longest)  # (+ the stopped trial's bookkeeping)
    assert len(trials) < 50
    outcomes = [t.user_attrs.get("outcome", "") for t in trials]
    assert outcomes[-1].startswith(("not run", "stopped by the budget")) or spent >= 3, outcomes
    if code == 0:  # the default trial finished within the budget: the run went on with the best model
        assert outcomes[0] == "complete" and (tmp_path / "run" / "results.json").is_file()
    else:  # the budget ended during the default trial: nothing to compare the search with, said
        assert code == 2 and "--budget" in out and outcomes[0] == "stopped by the budget", out


# -- train.epochs: auto, train.lr: auto --------------------------------------------------------------------------
def test_auto_epochs_and_lr_follow_the_documented_rules():
    from instructune.config import TrainConfig
    from instructune.train.auto import auto_epochs, auto_lr, resolve, total_steps
    from instructune.train.loop import Plan

    lora, full = TrainConfig(batch_size=8, epochs="auto", lr="auto"), TrainConfig(method="full", batch_size=8)
    assert auto_epochs(1400, lora)[0] == 1  # UCI sentiment's 1,400: 175 steps a pass, one pass
    assert auto_epochs(504, lora)[0] == 1  # the e-mail subjects' 504: 63 steps
    assert auto_epochs(80, lora)[0] == 5  # 10 steps a pass: 5 passes make 50 steps
    assert auto_epochs(8, lora)[0] == 10 and auto_epochs(8, full)[0] == 3  # capped; full fine-tuning sooner
    assert auto_lr(1400, 1400 * 2, lora)[0] == pytest.approx(1e-3 * (16 / 128) ** 0.5, rel=0.05)  # labels: noisy
    assert auto_lr(504, 504 * 40, lora)[0] == 1e-3 and auto_lr(504, 504 * 40, full)[0] == 5e-5  # capped at the base
    assert auto_lr(100, 100, lora)[0] == 2.5e-4  # never below a quarter of the base
    examples = [SimpleNamespace(input_ids=[1] * 5, n_supervised=2) for _ in range(37)]
    for epochs in (0.3, 1, 2.5):
        cfg = TrainConfig(batch_size=4, grad_accum=2, epochs=epochs)
        assert total_steps(37, cfg, epochs) == Plan(examples, cfg, 0, 0, 1, None, False).total_steps

    task = SimpleNamespace(encoded=lambda split, n: examples)
    said = resolve(lora, [task])
    assert lora.epochs == "auto" and lora.lr == "auto"  # the config keeps saying auto (the stages record that)
    assert lora.epoch_count == auto_epochs(37, lora)[0] and lora.learning_rate == auto_lr(37, 74, lora)[0]
    assert len(said) == 2 and said[0].startswith("train.epochs: auto -> ")
    with pytest.raises(Exception, match="auto is decided from the training data"):
        _ = TrainConfig(epochs="auto").epoch_count


def test_plan_prints_what_auto_comes_to(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, ("classification",), n_train=12, epochs="auto", lr="auto")
    code, out = cli("plan", write_config(tmp_path, cfg))
    assert code == 0, out
    # 12 examples, batch 4: 3 steps a pass, so 10 passes (the LoRA cap), 30 steps
    assert "train.epochs 10 (auto)" in out and "30 optimizer steps over 12 examples" in out, out
    lr = float(re.search(r"train\.lr ([0-9.e-]+) \(auto\)", out).group(1))
    assert 2.5e-4 <= lr < 1e-3  # a few label tokens per step: below LoRA's base 1e-3, at least a quarter of it


# -- bad input: exit 2, the option or key named, nothing written ------------------------------------------------
@pytest.mark.parametrize("args, named", [
    (["--budget", ""], "--budget"), (["--budget", "5x"], "--budget"), (["--budget", "-5m"], "--budget"),
    (["--budget", "99999h"], "--budget"), (["--trials", "0"], "--trials"), (["--trials", "abc"], "--trials"),
    (["--trials", "1000000000"], "--trials")])
def test_bad_sweep_options(tmp_path, tiny_model, args, named):
    code, out = cli("sweep", write_config(tmp_path, tiny_config(tmp_path, tiny_model)), *args)
    assert code == 2 and named in out, out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sweep, named", [
    (5, "sweep"), ({"space": {"train.nope": {"low": 1, "high": 2}}}, "train.nope"),
    ({"space": {"train.lr": {"low": 1, "high": 0.1}}}, "low (1) must be below high"),
    ({"space": {"train.lr": {"low": 1e-4, "high": 1e6, "log": True}}}, "space.train.lr"),
    ({"space": {"train.lora.r": {"choices": []}}}, "choices"), ({"space": {"train.lora.r": {"choices": [8, 0]}}},
                                                                "space.train.lora.r"),
    ({"space": {f"train.k{i}": {"low": 0, "high": 1} for i in range(33)}}, "space"),
    ({"task": "nope"}, "no task named 'nope'"), ({"budget": "soon"}, "sweep.budget"), ({"trials": 10**9}, "trials"),
    ({"space": {"train.lr": {"low": 1e-7, "high": 2e-7}}}, "trial 0 runs the config's own settings"),
    ({"space": {"tasks.0.template": {"choices": ["classification/nope"]}}}, "is not a classification template")])
def test_bad_sweep_config(tmp_path, tiny_model, sweep, named):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["sweep"] = sweep
    code, out = cli("sweep", write_config(tmp_path, cfg))
    assert code == 2 and named in out, out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["-1", "0", "soon", "[1]", "1e9", "true"])
def test_bad_auto_values(tmp_path, tiny_model, value):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model))
    for key in ("train.epochs", "train.lr"):
        code, out = cli("plan", config, "--set", f"{key}={value}")
        assert code == 2 and key in out and "or auto" in out, out


def test_importance_is_stated_only_from_enough_complete_trials():
    """fANOVA fitted to two or three trials ranks noise (the e-mail sweep had two): no importance below
    IMPORTANCE_TRIALS complete trials; from there on each searched setting gets a share, the shares summing to 1."""
    from instructune.sweep import IMPORTANCE_TRIALS, importance

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    objective = lambda t: -(t.suggest_float("lr", 1e-4, 1e-2, log=True) - 1e-3) ** 2 + 0 * t.suggest_int("r", 8, 32)
    study.optimize(objective, n_trials=IMPORTANCE_TRIALS - 1)
    assert importance(study, seed=0) == {}
    study.optimize(objective, n_trials=1)
    found = importance(study, seed=0)
    assert set(found) == {"lr", "r"} and abs(sum(found.values()) - 1) < 1e-3, found
