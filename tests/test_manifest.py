"""The manifest saved beside a fine-tuned model: written and read back whole, older files (no `version`) still read,
a newer version refused, and a damaged file named with its key."""

from __future__ import annotations

import json

import pytest

from instructune.errors import InstructuneError
from instructune.manifest import MANIFEST, VERSION, Manifest

TEMPLATE = {"task": "tickets", "type": "classification",
            "template": {"prompt": "Classify: {{ text }}", "completion": "{{ label }}", "separator": "\nCategory: "},
            "fields": {}, "variables": {}, "choices": ["billing", "delivery"], "system_prompt": None,
            "max_new_tokens": 8, "max_render_chars": 1000000, "max_render_seconds": 2.0, "strict_choices": False}

# What `instructune train` wrote before the manifest had a version (the keys of a real one, values shortened).
UNVERSIONED = {
    "base_model": "/models/tiny", "base_model_hub_id": "org/tiny", "method": "lora", "chat_template": True,
    "encoder_decoder": False, "tasks": {"tickets": TEMPLATE},
    "held_out_tasks": {"qa_check": {**TEMPLATE, "task": "qa_check", "choices": None}},
    "data_fingerprint": "55f67d69cf6223be",
    "config": {"name": "tiny", "seed": 0, "model": {"name": "/models/tiny", "gguf_file": None, "chat_template": "auto",
                                                    "trust_remote_code": False, "revision": None}},
    "versions": {"instructune": "0.1.0", "torch": "2.13.0"},
    "audit": {"examples": 12, "tokens": 1013, "supervised_tokens": 51, "eos_supervised": True},
    "final_loss": 5.96, "train_id": "8a0b6e973257", "trainable_parameters": 16384, "total_parameters": 47776,
    "memory": {"planned": {"weights": 191104}, "planned_peak": 501988928, "strategy": "ddp", "peak": [1, 2]},
}


def _write(folder, content) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(content if isinstance(content, str) else json.dumps(content))


def test_round_trip_keeps_every_key_and_writes_the_version_first(tmp_path):
    manifest = Manifest.model_validate({"version": VERSION, **UNVERSIONED, "a_later_key": {"kept": [1, 2]}})
    manifest.write(tmp_path)
    written = json.loads((tmp_path / MANIFEST).read_text())
    assert list(written)[0] == "version" and written == {"version": VERSION, **UNVERSIONED, "a_later_key": {"kept": [1, 2]}}
    back = Manifest.read(tmp_path)
    assert back == manifest and back.to_dict() == written


def test_keys_not_given_are_not_written_as_null(tmp_path):
    minimal = {k: UNVERSIONED[k] for k in ("chat_template", "tasks", "config")}
    Manifest.model_validate(minimal).write(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text()) == {"version": 1, **minimal}


def test_a_manifest_without_version_reads_as_version_1(tmp_path):
    _write(tmp_path, UNVERSIONED)
    manifest = Manifest.read(tmp_path)
    assert manifest.version == 1 and manifest.task_names() == ["tickets"]
    assert manifest.model_cfg().name == "/models/tiny" and manifest.audit["eos_supervised"] is True
    template = manifest.task_template()  # the only trained task
    assert template.choices == ["billing", "delivery"] and template.separator == "\nCategory: "
    fmt = manifest.prompt_format(None, template.separator)
    assert (fmt.chat, fmt.separator, fmt.seq2seq) == (True, "\nCategory: ", False)
    assert list(manifest.templates(held_out=True)) == ["tickets", "qa_check"] and list(manifest.templates()) == ["tickets"]


def test_task_template_names_the_tasks_the_model_learned(tmp_path):
    two = {**UNVERSIONED, "tasks": {"tickets": TEMPLATE, "other": {**TEMPLATE, "task": "other"}}}
    _write(tmp_path, two)
    manifest = Manifest.read(tmp_path)
    with pytest.raises(InstructuneError, match=r"unknown task 'nope'; this model learned \['other', 'tickets'\]") as e:
        manifest.task_template("nope")
    assert e.value.where == "--task"
    with pytest.raises(InstructuneError, match=r"several tasks; choose one with --task: \['other', 'tickets'\]"):
        manifest.task_template()
    with pytest.raises(InstructuneError, match="unknown task 'qa_check'"):  # held out: evaluated, never trained
        manifest.task_template("qa_check")


def test_a_newer_version_is_refused_with_what_to_do(tmp_path):
    _write(tmp_path, {**UNVERSIONED, "version": VERSION + 1, "tasks": "a layout this version does not know"})
    with pytest.raises(InstructuneError, match=f"manifest version {VERSION + 1} was written by a newer instructune; "
                                               f"this one reads versions up to {VERSION}: upgrade instructune") as e:
        Manifest.read(tmp_path)
    assert e.value.where == f"{tmp_path / MANIFEST}: version"


@pytest.mark.parametrize("content, where, message", [
    ("{\"tasks\": ", ":1", "not valid JSON"),
    ("[]", "", "expected a JSON object, not list"),
    ({**UNVERSIONED, "version": "1"}, ": version", "'version' should be a whole number, not str"),
    ({**UNVERSIONED, "version": 0}, ": version", "greater than or equal to 1"),
    ({**UNVERSIONED, "chat_template": "yes"}, ": chat_template", "'chat_template' should be true or false, not str"),
    ({**UNVERSIONED, "final_loss": "low"}, ": final_loss", "'final_loss' should be a number, not str"),
    ({**UNVERSIONED, "tasks": {"tickets": []}}, ": tasks.tickets", "'tasks.tickets' should be a JSON object, not list"),
    ({**UNVERSIONED, "tasks": {"tickets": {**TEMPLATE, "colour": "red"}}}, ": tasks.tickets",
     "the saved template cannot be read"),
    ({k: v for k, v in UNVERSIONED.items() if k != "config"}, ": config", "the key 'config' is missing"),
    ({**UNVERSIONED, "config": {"model": {"name": 5}}}, ": config.model.name", "string"),
])
def test_a_damaged_manifest_is_named_with_the_file_and_key(tmp_path, content, where, message):
    _write(tmp_path, content)
    with pytest.raises(InstructuneError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as e:
        Manifest.read(tmp_path)
    assert e.value.where == f"{tmp_path / MANIFEST}{where}"


def test_no_manifest_is_named(tmp_path):
    with pytest.raises(InstructuneError, match=f"no {MANIFEST} here") as e:
        Manifest.read(tmp_path)
    assert e.value.where == str(tmp_path)
