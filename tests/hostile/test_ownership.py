"""Nothing a user can lose goes silently: export folders are owned (a marker listing the files an export wrote,
checked before the first byte), retraining removes only what exports wrote, `predict` never overwrites an input
field, a checkpoint beside a new training needs --resume or --restart, damaged checkpoints name the usable one."""

from __future__ import annotations

import json
import shutil

import pytest

from hostile_helpers import rows_of, run_cli, snapshot, tiny_config, write_config, write_jsonl
from instructune import rundir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A finished run (one training step), and the config of a training that diverged at step 3 (checkpoints of
    steps 1 and 2 kept)."""
    tmp = tmp_path_factory.mktemp("owned")
    cfg = tiny_config(tmp, tiny_model, n_train=4)
    cfg["baseline"] = {"enabled": False}
    code, out = run_cli("train", write_config(tmp, cfg))
    assert code == 0, out
    diverging = tiny_config(tmp / "d", tiny_model, n_train=12, lr=1000, max_grad_norm=None, method="full",
                            epochs=3, save_every=1)
    diverging["baseline"] = {"enabled": False}
    config = write_config(tmp / "d", diverging)
    code, out = run_cli("train", config)
    assert code == 3, out
    return tmp / "run", config


def _mine(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "parity.json").write_text('{"mine": true}')
    (folder / "notes.txt").write_text("my notes")
    return snapshot(folder)


@pytest.mark.parametrize("fmt", ["gguf", "ollama", "merged"])
def test_export_into_a_users_folder_is_refused_before_the_first_byte(tmp_path, trained, fmt):
    run, _ = trained
    before = _mine(tmp_path / "mine")
    code, out = run_cli("export", run, "--format", fmt, "--out", tmp_path / "mine", "--no-check")
    assert code == 2 and str(tmp_path / "mine") in out and "not made by `instructune export`" in out, out
    assert snapshot(tmp_path / "mine") == before and "Traceback" not in out


def test_an_export_marks_its_folder_and_retraining_keeps_what_it_did_not_write(tmp_path, trained, capsys):
    run = shutil.copytree(trained[0], tmp_path / "run")
    code, out = run_cli("export", run, "--format", "gguf", "--no-check")
    assert code == 0, out
    folder = run / "export" / "gguf-f16"
    marker = json.loads((folder / rundir.EXPORT_MARKER).read_text())
    assert marker["files"] == sorted([rundir.EXPORT_MARKER, "model.gguf"]) and marker["format"] == "gguf"
    code, out = run_cli("export", run, "--format", "gguf", "--no-check")  # its own folder: replaced
    assert code == 0, out
    (folder / "notes.txt").write_text("mine")
    (run / "export" / "README.txt").write_text("mine too")
    capsys.readouterr()
    rundir.begin(run, "train", {})  # what retraining does first
    said = capsys.readouterr().out
    assert not (folder / "model.gguf").exists() and not (folder / rundir.EXPORT_MARKER).exists()
    assert (folder / "notes.txt").read_text() == "mine" and (run / "export" / "README.txt").read_text() == "mine too"
    assert "removed the exports" in said and "model.gguf" in said and "kept 2 file(s)" in said


def test_predict_never_overwrites_an_input_field(tmp_path, trained):
    run, _ = trained
    rows = [{"text": "I was charged twice", "label": "billing", "prediction": "gold"},
            {"text": "the app crashes", "label": "technical", "prediction": "gold"}]
    src = write_jsonl(tmp_path / "gold.jsonl", rows)
    before = src.read_bytes()
    code, out = run_cli("predict", run, "--input", src)
    assert code == 0, out
    assert "label, prediction" in out and "instructune_label" in out
    got = rows_of(tmp_path / "gold.predictions.jsonl")
    assert [{k: r[k] for k in ("text", "label", "prediction")} for r in got] == rows  # the gold labels survive
    assert all(r["instructune_label"] == r["instructune_prediction"] and 0 < r["instructune_probability"] <= 1
               for r in got)
    assert src.read_bytes() == before
    code, out = run_cli("predict", run, "--input", src, "--batch-size", "-2", "--output", tmp_path / "o.jsonl")
    assert code == 2 and "--batch-size" in out and not (tmp_path / "o.jsonl").exists()


def test_a_checkpoint_beside_a_new_training_needs_resume_or_restart(trained):
    _, config = trained
    checkpoint = config.parent / "run" / "checkpoint"
    before = snapshot(checkpoint.parent)
    for command in ("train", "run"):
        code, out = run_cli(command, config, "--set", "train.lr=0.001")
        assert code == 2, out
        assert "--resume" in out and "--restart" in out and "step 2" in out and "train.lr: 1000.0 -> 0.001" in out
    code, out = run_cli("train", config, "--resume", "--restart")
    assert code == 2 and "give one" in out
    assert snapshot(checkpoint.parent) == before


def test_when_both_checkpoints_are_damaged_none_is_offered(tmp_path, trained):
    run = shutil.copytree(trained[1].parent / "run", tmp_path / "run")
    cfg = json.loads(json.dumps(__import__("yaml").safe_load(trained[1].read_text())))
    cfg["output_dir"] = str(run)
    config = write_config(tmp_path, cfg)
    newest = run / "checkpoint" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    code, out = run_cli("train", config, "--resume")
    assert code == 2 and "checkpoint.old reads back whole" in out, out
    older = run / "checkpoint.old" / "trainable.safetensors"
    older.write_bytes(older.read_bytes()[:100])
    code, out = run_cli("train", config, "--resume")
    assert code == 2 and "is damaged too" in out and "--restart" in out and "reads back whole" not in out, out
