"""Each templated task type end to end on a tiny random model: baseline → train → evaluate → report → generate."""

import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from instructune.cli import app

TYPES = ["classification", "summarization", "translation", "qa", "ner"]


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("task_type", TYPES)
def test_task_type_end_to_end(tmp_path, tiny_model, task_type):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, (task_type,)))
    cli("run", config)
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    task = results["tasks"][f"tiny_{task_type}"]
    assert set(task["results"]) == {"base_0shot", "base_1shot", "base_2shot", "finetuned"}
    primary = task["primary_metric"]
    for variant in task["results"].values():
        assert 0.0 <= variant[primary] <= 1.0
    assert primary in task["change_vs_best_base"]
    assert (run / "report.md").read_text().count("| metric |") == 1
    # the model folder loads with the template it was trained with
    manifest = json.loads((run / "model" / "instructune.json").read_text())
    assert manifest["tasks"][f"tiny_{task_type}"]["type"] == task_type
    assert (run / "model" / "adapter_model.safetensors").is_file()
    assert manifest["audit"]["eos_supervised"] is True


def test_stages_one_at_a_time_and_generate(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, ("classification", "qa"))
    config = write_config(tmp_path, cfg)
    cli("baseline", config)
    assert (tmp_path / "run" / "baseline.json").is_file()
    cli("train", config, "--set", "train.method=full")
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    cli("evaluate", config)
    out = cli("report", config)
    assert "tiny_classification: accuracy" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"]["method"] == "full"
    # inference renders the saved template: plain text for one-field tasks, JSON for QA
    cli("generate", "--model", tmp_path / "run", "--task", "tiny_classification", "my parcel is late")
    cli("generate", "--model", tmp_path / "run", "--task", "tiny_qa",
        json.dumps({"context": "Maria founded Bluefin Labs in 1901.", "question": "When?"}))
    bad = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "run"), "hello"])
    assert bad.exit_code == 2 and "--task" in bad.output


def test_plain_model_without_chat_template(tmp_path, tiny_plain_model):
    cfg = tiny_config(tmp_path, tiny_plain_model, ("translation",))
    cli("run", write_config(tmp_path, cfg))
    manifest = json.loads((tmp_path / "run" / "model" / "instructune.json").read_text())
    assert manifest["chat_template"] is False


def test_data_preview_shows_trained_tokens(tmp_path, tiny_model):
    out = cli("data", "preview", write_config(tmp_path, tiny_config(tmp_path, tiny_model, ("ner",))))
    assert "supervised tokens" in out and "Maria" in out
    assert not (tmp_path / "run").exists()  # preview writes nothing


def test_templates_listing():
    out = cli("templates", "qa")
    assert "qa/read-answer" in out and "classification/" not in out


def test_t5_trains_and_evaluates_through_the_same_commands(tmp_path, tiny_t5):
    """An encoder-decoder model: prompt to the encoder, completion (and EOS) to the decoder, same protocol."""
    cfg = tiny_config(tmp_path, tiny_t5, ("classification", "summarization"), epochs=2, lr=5e-3)
    cli("run", write_config(tmp_path, cfg))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["tasks"]) == {"tiny_classification", "tiny_summarization"}
    manifest = json.loads((tmp_path / "run" / "model" / "instructune.json").read_text())
    assert manifest["encoder_decoder"] is True and manifest["audit"]["eos_supervised"] is True
    adapter = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]  # it learns
    cli("generate", "--model", tmp_path / "run", "--task", "tiny_classification", "my parcel is late")
    cli("train", write_config(tmp_path, cfg), "--set", "train.method=full", "--set", "train.epochs=1")
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    cli("evaluate", write_config(tmp_path, cfg))
