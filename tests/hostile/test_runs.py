"""Hostile runs: the user's folders, concurrent commands, interruptions, divergence, changed inputs on resume and
kills during a checkpoint write. Faults are real (signals to real processes); each test fails if its fix is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from instructune.cli import app

ENV = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Runs the real CLI in a child process after a patch that, at a chosen moment, writes MARKER and waits to be killed.
WRAPPER = """
import pathlib, sys, time
marker = pathlib.Path(sys.argv[1])
def hold():
    marker.write_text("here")
    time.sleep(3600)
{patch}
from instructune.cli import main
sys.argv = ["instructune", *sys.argv[2:]]
main()
"""


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def held_child(tmp_path: Path, patch: str, *args) -> subprocess.Popen:
    """The CLI in a child process that holds (sleeps) where `patch` calls hold(); returns once it is holding."""
    marker = tmp_path / "holding"
    marker.unlink(missing_ok=True)
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(patch=patch))
    # Ctrl-C as a terminal sends it, even when the tests themselves run in a background job (which ignores SIGINT)
    proc = subprocess.Popen([sys.executable, str(script), str(marker), *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the child never reached the point to hold: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    return proc


def log_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_user_files_under_output_dir_are_never_touched(tmp_path, tiny_model):
    mine = tmp_path / "my-project"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "weights.bin").write_bytes(b"precious")
    (mine / "config.yaml").write_text("mine: true\n")
    before = snapshot(mine)
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["output_dir"] = str(mine)
    for command in ("run", "train", "baseline"):
        result = cli(command, write_config(tmp_path, cfg))
        assert result.exit_code == 2, result.output
        assert "output_dir" in result.output and "not made by instructune" in result.output
    assert snapshot(mine) == before


@pytest.mark.parametrize("name", ["..", "."])
def test_a_name_that_is_a_path_is_refused(tmp_path, tiny_model, monkeypatch, name):
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work / "runs")  # runs/.. is the working folder's parent: must never become a run folder
    cfg = tiny_config(tmp_path, tiny_model)
    del cfg["output_dir"]
    cfg["name"] = name
    before = snapshot(tmp_path / "work")
    result = cli("train", write_config(tmp_path, cfg))
    assert result.exit_code == 2 and "name" in result.output, result.output
    assert snapshot(tmp_path / "work") == before


@pytest.mark.parametrize("where", ["/", "HOME", "CWD"])
def test_root_home_and_working_folder_are_refused(tmp_path, tiny_model, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    target = {"/": "/", "HOME": str(Path.home()), "CWD": str(tmp_path)}[where]
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["output_dir"] = target
    result = cli("train", write_config(tmp_path, cfg))
    assert result.exit_code == 2 and "output_dir" in result.output, result.output


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, tiny_model):
    file = tmp_path / "results.txt"
    file.write_text("mine")
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["output_dir"] = str(file)
    result = cli("train", write_config(tmp_path, cfg))
    assert result.exit_code == 2 and "output_dir" in result.output and "Traceback" not in result.output
    assert file.read_text() == "mine"


def test_a_second_command_on_the_same_run_folder_is_refused_with_the_holders_pid(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, save_every=1))
    holder = held_child(tmp_path, "import instructune.experiment as e\n_real = e.run_baseline\n"
                                  "e.run_baseline = lambda *a, **k: hold()", "run", config)
    try:
        result = cli("train", config)
        assert result.exit_code == 2, result.output
        assert f"PID {holder.pid}" in result.output and "another instructune command" in result.output
        assert not (tmp_path / "run" / "model").exists()
    finally:
        holder.kill()
        holder.wait()


def test_ctrl_c_during_a_reruns_evaluation_then_report_is_refused(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model))
    assert cli("run", config).exit_code == 0
    run = tmp_path / "run"
    old_results = (run / "results.json").read_bytes()
    proc = held_child(tmp_path, "import instructune.experiment as e\n_real = e.load_finetuned\n"
                                "e.load_finetuned = lambda *a, **k: hold()", "run", config)
    proc.send_signal(signal.SIGINT)  # a real Ctrl-C, during the rerun's evaluation
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    assert not (run / "results.json").exists() and not (run / "finetuned.json").exists()  # no old results left beside
    status = json.loads((run / "run_status.json").read_text())["stages"]
    assert status["train"]["complete"] and not status["evaluate"]["complete"]
    result = cli("report", config)
    assert result.exit_code == 2 and "evaluate stage is not complete" in result.output, result.output
    assert not (run / "results.json").exists()
    assert old_results  # (the first run did report)


def test_report_refuses_outputs_made_from_another_config(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model))
    assert cli("run", config).exit_code == 0
    result = cli("report", config, "--set", "train.lr=0.5")
    assert result.exit_code == 2 and "train stage was made from other inputs" in result.output
    assert "train.lr" in result.output


def test_a_nan_inducing_learning_rate_stops_with_exit_3_and_writes_no_result(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, lr=1000, max_grad_norm=None, method="full",
                                                epochs=3))
    result = cli("run", config)
    assert result.exit_code == 3, result.output
    assert "training diverged at step" in result.output and "Traceback" not in result.output
    run = tmp_path / "run"
    for name in ("results.json", "report.md", "report.html", "finetuned.json", "model"):
        assert not (run / name).exists(), name
    assert not json.loads((run / "run_status.json").read_text())["stages"]["train"]["complete"]
    for path in run.rglob("*.json"):  # every JSON file instructune wrote is strict JSON
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def _kill_at_checkpoint(tmp_path, config, step: int) -> None:
    proc = held_child(tmp_path, "import instructune.train.checkpoint as ckpt\n_real = ckpt.save_checkpoint\n"
                                "def patched(*a, **k):\n    _real(*a, **k)\n"
                                f"    if a[4]['step'] == {step}: hold()\nckpt.save_checkpoint = patched",
                      "train", config)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_resume_with_changed_data_is_refused_with_the_differences(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, n_train=24, save_every=1)
    config = write_config(tmp_path, cfg)
    _kill_at_checkpoint(tmp_path, config, 2)
    checkpoint = tmp_path / "run" / "checkpoint"
    before = snapshot(checkpoint)
    result = cli("train", config, "--resume", "--set", "tasks.0.data.max_train=20", "--set", "train.lr=0.002")
    assert result.exit_code == 2, result.output
    assert "belongs to another training" in result.output
    assert "data:" in result.output and "config.train.lr: null -> 0.002" in result.output
    assert snapshot(checkpoint) == before  # nothing trained, nothing saved over it
    assert not (tmp_path / "run" / "model").exists()


def test_resume_after_changing_the_lora_rank_is_refused_not_a_traceback(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, n_train=24, save_every=1))
    _kill_at_checkpoint(tmp_path, config, 2)
    result = cli("train", config, "--resume", "--set", "train.lora.r=4")
    assert result.exit_code == 2 and "train.lora.r: 16 -> 4" in result.output and "Traceback" not in result.output


def test_a_truncated_checkpoint_is_named_and_the_older_one_offered(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, n_train=24, save_every=1))
    _kill_at_checkpoint(tmp_path, config, 3)
    state = tmp_path / "run" / "checkpoint" / "trainable.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    result = cli("train", config, "--resume")
    assert result.exit_code == 2, result.output
    assert "checkpoint is damaged or truncated" in result.output and "checkpoint.old" in result.output


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one_bit_identically(tmp_path, tiny_model):
    common = dict(n_train=24, epochs=2, save_every=1, lora={"dropout": 0.1})
    whole = write_config(tmp_path, {**tiny_config(tmp_path / "a", tiny_model, **common)}, "whole.yaml")
    assert cli("train", whole).exit_code == 0
    expected = log_losses(tmp_path / "a" / "run")
    cut = write_config(tmp_path, tiny_config(tmp_path / "b", tiny_model, **common), "cut.yaml")
    # the kill lands inside save_checkpoint of step 4: weights written to the temporary folder, state not yet
    proc = held_child(tmp_path, "import torch\n_real = torch.save\n"
                                "def patched(obj, f, *a, **k):\n"
                                "    if isinstance(obj, dict) and obj.get('step') == 4: hold()\n"
                                "    return _real(obj, f, *a, **k)\ntorch.save = patched", "train", cut)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "b" / "run"
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["step"] == 3
    assert list(run.glob(".checkpoint.*")), "the kill should have left a half-written temporary checkpoint"
    result = subprocess.run([sys.executable, "-m", "instructune.cli", "train", str(cut), "--resume"], env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert log_losses(run) == expected  # bit-identical, step for step
    assert not list(run.glob(".checkpoint.*")) and not (run / "checkpoint").exists()
    assert not (run / "checkpoint.old").exists()


def test_data_lint_says_how_many_prompts_max_length_cuts(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, ("summarization",), max_length=24))
    result = cli("data", "lint", config)
    assert result.exit_code == 0, result.output
    assert "12 training pairs longer than train.max_length 24" in result.output and "tokens cut" in result.output
    roomy = cli("data", "lint", write_config(tmp_path, tiny_config(tmp_path, tiny_model, ("summarization",))))
    assert "longer than train.max_length" not in roomy.output
