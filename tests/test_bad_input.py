"""Every bad input ends with a message naming the file and line (or config key), exit status 2, and no run folder."""

import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, write_config, write_jsonl
from instructune.cli import app


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if hasattr(result, "stderr") else "")


def fails_cleanly(tmp_path, cfg_dict, *expected):
    config = write_config(tmp_path, cfg_dict)
    code, out = run_cli("run", config)
    assert code == 2, out
    for text in expected:
        assert text in out, out
    assert not (tmp_path / "run").exists(), "a run folder was written for bad input"
    return out


def test_malformed_jsonl_line(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    train = cfg["tasks"][0]["data"]["train"]
    lines = open(train).read().splitlines()
    lines[4] = '{"text": "broken", "label": '
    open(train, "w").write("\n".join(lines) + "\n")
    fails_cleanly(tmp_path, cfg, f"{train}:5", "malformed JSON")


def test_record_missing_a_template_field(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    test = cfg["tasks"][0]["data"]["test"]
    rows = [json.loads(l) for l in open(test)]
    del rows[2]["text"]
    write_jsonl(test, rows)
    fails_cleanly(tmp_path, cfg, f"{test}:3", "text")


def test_field_mapping_to_a_missing_field(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["fields"] = {"text": "review_body"}
    fails_cleanly(tmp_path, cfg, ":1", "review_body")


def test_empty_completion(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, ("summarization",))
    train = cfg["tasks"][0]["data"]["train"]
    rows = [json.loads(l) for l in open(train)]
    rows[6]["summary"] = "  "
    write_jsonl(train, rows)
    fails_cleanly(tmp_path, cfg, f"{train}:7", "empty completion")


def test_unknown_task_type(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["type"] = "sentiment"
    out = fails_cleanly(tmp_path, cfg, "tasks.0.type", "classification")
    assert "config.yaml:" in out  # the line of the key in the YAML file


def test_unknown_template_name(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["template"] = "classification/nonexistent"
    fails_cleanly(tmp_path, cfg, "unknown template", "classification/choices")


def test_user_template_with_bad_jinja(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["template"] = {"prompt": "Text: {{ text ", "completion": "{{ label }}"}
    fails_cleanly(tmp_path, cfg, "template.prompt", "not valid Jinja")


def test_unknown_config_key(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["train"]["epochz"] = 3
    fails_cleanly(tmp_path, cfg, "unknown config key 'epochz'", "train.epochz")


def test_wrong_type_for_a_key(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["train"]["batch_size"] = "eight"
    fails_cleanly(tmp_path, cfg, "train.batch_size", "eight")


def test_wrong_override(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model))
    code, out = run_cli("run", config, "--set", "train.lr=-1")
    assert code == 2 and "train.lr" in out
    code, out = run_cli("run", config, "--set", "train.nope=1")
    assert code == 2 and "unknown config key 'nope'" in out
    assert not (tmp_path / "run").exists()


def test_model_path_that_does_not_exist(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["model"]["name"] = str(tmp_path / "no" / "such" / "model")
    fails_cleanly(tmp_path, cfg, "model.name", "does not exist")


def test_training_split_too_small_for_k_shot(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, n_train=3)
    cfg["baseline"]["k"] = 5
    fails_cleanly(tmp_path, cfg, "baseline.k", "5-shot")


def test_data_file_not_found(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["data"]["test"] = str(tmp_path / "missing.jsonl")
    fails_cleanly(tmp_path, cfg, "missing.jsonl", "not found")


def test_not_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("name: x\ntasks: [\n  - oops: {\n")
    code, out = run_cli("run", config)
    assert code == 2 and "config.yaml:" in out and "YAML" in out


def test_an_accelerate_launch_configured_for_fsdp_takes_the_fsdp_path(monkeypatch):
    from instructune.runtime import check_launcher

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    assert check_launcher() == "fsdp"  # not refused: train.strategy fsdp's path (tests/test_fsdp.py runs one)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert check_launcher() is None


def test_an_accelerate_launch_configured_for_deepspeed_is_refused(tmp_path, tiny_model, monkeypatch):
    key = "ACCELERATE_USE_DEEPSPEED"
    monkeypatch.setenv(key, "true")  # what `accelerate launch` sets for a DeepSpeed config
    out = fails_cleanly(tmp_path, tiny_config(tmp_path, tiny_model), key, "not supported", "--multi_gpu")
    code, out = run_cli("train", write_config(tmp_path, tiny_config(tmp_path, tiny_model)))
    assert code == 2 and key in out and not (tmp_path / "run").exists()
