"""Refused early: what the config and data alone decide fails `data lint` and every command before a run folder
exists (unknown best-prompt names, no validation split to choose on, FSDP clashes, a model's own code, max_length
past the model), each process of a launch alike; and warnings for what is legal but likely wrong."""

from __future__ import annotations

import json
import shutil

import pytest

from hostile_helpers import accepted, refused, run_cli, tiny_config, write_config


@pytest.mark.parametrize("case", ["unknown-template", "no-validation-split"])
def test_best_prompt_settings_are_refused_by_lint_and_run_before_the_run_folder(tmp_path, tiny_model, case):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["baseline"]["templates"] = ["classification/choices", "classification/no-such"] if case == "unknown-template" \
        else "all"
    if case == "no-validation-split":
        del cfg["tasks"][0]["data"]["validation"]
    fragment = "classification/no-such" if case == "unknown-template" else "validation split"
    for command in (("data", "lint"), ("run",), ("baseline",)):
        refused(tmp_path, cfg, "baseline.templates", fragment, command=command)


def test_fsdp_with_eval_metric_is_refused_by_lint_and_by_each_launched_process(tmp_path, tiny_model, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_model, strategy="fsdp", eval_metric=True)
    refused(tmp_path, cfg, "train.eval_metric", "fsdp")
    for rank in ("0", "1"):  # as torchrun starts them: no process group exists yet, none is waited for
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        refused(tmp_path, cfg, "train.eval_metric", command=("train",))


def test_a_model_that_needs_its_own_code_is_refused_before_anything_runs(tmp_path, tiny_model):
    model = tmp_path / "custom"
    shutil.copytree(tiny_model, model)
    settings = json.loads((model / "config.json").read_text())
    settings.update(model_type="my_custom_llama", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                            "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (model / "config.json").write_text(json.dumps(settings))
    cfg = tiny_config(tmp_path, model)
    for command in (("data", "lint"), ("run",)):
        refused(tmp_path, cfg, "model.trust_remote_code", command=command)


def test_max_length_past_the_models_positions_is_refused(tmp_path, tiny_model):
    refused(tmp_path, tiny_config(tmp_path, tiny_model, max_length=4096), "train.max_length", "1024 positions",
            command=("train",))


def test_likely_mistakes_are_warned_about_not_refused(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, strategy="fsdp", max_length=9)
    cfg["tasks"][0]["template"] = {"prompt": "Message: {{ text }}\nCategory (it is {{ label }}):",
                                   "completion": "{{ label }}"}
    out = accepted(tmp_path, cfg)
    assert "strategy: fsdp with one process" in out
    assert "train.max_length 9 leaves" in out and "cut into its instruction" in out
    assert "reads {{ label }}, the answer" in out
    assert "3 warning(s) about the config or the machine" in out.strip().splitlines()[-1], out  # never "no warnings"
    roomy = accepted(tmp_path, tiny_config(tmp_path, tiny_model))
    assert "warning: train" not in roomy and "the answer the model" not in roomy
    assert "about the config" not in roomy.strip().splitlines()[-1], roomy


def test_templates_and_demo_data_end_in_one_line(tmp_path):
    code, out = run_cli("templates", "nonsense")
    assert code == 2 and "unknown task type 'nonsense'" in out and "classification" in out
    file = tmp_path / "a-file"
    file.write_text("mine")
    code, out = run_cli("demo-data", file)
    assert code == 2 and str(file) in out and "not a folder" in out and file.read_text() == "mine"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my own notes")
    code, out = run_cli("demo-data", mine)
    assert code == 2 and "not made by `instructune demo-data`" in out
    assert [p.name for p in mine.iterdir()] == ["README.md"] and (mine / "README.md").read_text() == "my own notes"
    assert "Traceback" not in out
