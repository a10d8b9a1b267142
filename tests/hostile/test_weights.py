"""Hostile weight files: pickle weights (.bin/.pt/.pkl/.ckpt) are refused before anything is read, and damaged
safetensors, GGUF, config.json and instructune.json files are named in one line with exit 2, never a traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from instructune.cli import app
from instructune.config import ModelConfig
from instructune.errors import InstructuneError
from instructune.manifest import Manifest
from instructune.models import check_model_folder, load_finetuned, load_model

TASK = "tiny_classification"


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    out = result.output
    try:
        out += "" if result.stderr in out else result.stderr
    except ValueError:  # stderr mixed into output
        pass
    return result.exit_code, out


def assert_refused(code: int, out: str, *fragments: str) -> None:
    assert code == 2, out
    for fragment in fragments:
        assert fragment in out, out
    assert "Traceback" not in out and "internal error" not in out, out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model) -> Path:
    """The model/ folder of one tiny LoRA run (an adapter, its manifest and tokenizer), trained once for the module."""
    tmp = tmp_path_factory.mktemp("weights-run")
    cfg = tiny_config(tmp, tiny_model, n_train=4)
    with pytest.MonkeyPatch.context() as mp:  # the per-test autouse settings do not reach a module fixture
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(key, "1")
        mp.setenv("INSTRUCTUNE_CACHE", str(tmp / "cache"))
        code, out = invoke("train", write_config(tmp, cfg))
    assert code == 0, out
    return tmp / "run" / "model"


@pytest.fixture
def adapter(trained, tmp_path) -> Path:
    """A copy of the trained adapter folder, to damage."""
    return Path(shutil.copytree(trained, tmp_path / "adapter"))


@pytest.fixture
def base(tiny_model, tmp_path) -> Path:
    """A copy of the tiny base model folder, to damage (the session fixture itself is never touched)."""
    return Path(shutil.copytree(tiny_model, tmp_path / "base"))


@pytest.fixture
def full(base, trained, tmp_path) -> Path:
    """A full fine-tuned model folder: whole weights, tokenizer and manifest."""
    folder = Path(shutil.copytree(base, tmp_path / "full"))
    shutil.copy(trained / "instructune.json", folder / "instructune.json")
    return folder


def generate(model_dir: Path) -> tuple[int, str]:
    return invoke("generate", "--model", model_dir, "--task", TASK, "my parcel is late")


def lint_with_model(tmp_path: Path, tiny_model: Path, name: str) -> tuple[int, str]:
    """`data lint` on a tiny config whose model.name is `name` (the model is resolved before any data is read)."""
    cfg = tiny_config(tmp_path, tiny_model, n_train=4)
    cfg["model"]["name"] = name
    return invoke("data", "lint", write_config(tmp_path, cfg))


def to_pickle(folder: Path, safetensors_name: str, pickle_name: str) -> Path:
    """Replace a safetensors weight file by the same tensors written with torch.save (a pickle)."""
    tensors = load_file(folder / safetensors_name)
    (folder / safetensors_name).unlink()
    torch.save(tensors, folder / pickle_name)
    return folder / pickle_name


class _Payload:
    """Unpickling this creates a folder: proof that a pickle file was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


# -- only safetensors -------------------------------------------------------------------------------------------


def test_adapter_model_bin_refused(adapter):
    """Issue 11: an adapter with adapter_model.bin instead of safetensors was loaded by `generate`."""
    to_pickle(adapter, "adapter_model.safetensors", "adapter_model.bin")
    code, out = generate(adapter)
    assert_refused(code, out, "adapter_model.bin", "only safetensors", "safe_serialization=True")


def test_adapter_model_bin_refused_by_the_loader(adapter):
    to_pickle(adapter, "adapter_model.safetensors", "adapter_model.bin")
    with pytest.raises(InstructuneError, match="only safetensors") as e:
        load_model(str(adapter), ModelConfig(name=str(adapter)))
    assert e.value.where == str(adapter / "adapter_model.bin")


def test_full_model_pytorch_model_bin_refused(full):
    to_pickle(full, "model.safetensors", "pytorch_model.bin")
    code, out = generate(full)
    assert_refused(code, out, "pytorch_model.bin", "only safetensors")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "weights.pkl", "last.ckpt",
                                  "pytorch_model-00001-of-00002.bin"])
def test_base_folder_with_pickle_weights_only_refused(tmp_path, tiny_model, base, name):
    to_pickle(base, "model.safetensors", name)
    code, out = lint_with_model(tmp_path, tiny_model, str(base))
    assert_refused(code, out, f"model.name: {base / name}", "only safetensors")
    assert not (tmp_path / "run").exists()


def test_pickle_is_never_unpickled(tmp_path, base):
    """A .pkl whose unpickling runs code: refused before it is opened, so the code never runs."""
    marker = tmp_path / "pwned"
    (base / "model.safetensors").unlink()
    (base / "model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(InstructuneError, match="only safetensors"):
        load_model(str(base), ModelConfig(name=str(base)))
    assert not marker.exists()


def test_adapter_whose_base_folder_is_pickle_only_refused(adapter, base):
    to_pickle(base, "model.safetensors", "pytorch_model.bin")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    code, out = generate(adapter)
    assert_refused(code, out, str(base / "pytorch_model.bin"), "only safetensors")


def test_safetensors_beside_a_pickle_loads_the_safetensors(base):
    """A stray pickle next to the safetensors file (e.g. training_args.bin) is not refused: it is never read."""
    (base / "training_args.bin").write_bytes(b"not even a pickle")
    model = load_model(str(base), ModelConfig(name=str(base)))
    assert model.config.vocab_size > 0


# -- damaged files -----------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated": _truncate,
    "garbage": lambda p: p.write_bytes(b"this is not a safetensors file" * 20),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_model_safetensors_named(tmp_path, tiny_model, base, damage):
    DAMAGE[damage](base / "model.safetensors")
    code, out = lint_with_model(tmp_path, tiny_model, str(base))
    assert_refused(code, out, f"model.name: {base / 'model.safetensors'}", "not a readable safetensors file")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_adapter_safetensors_named(adapter, damage):
    DAMAGE[damage](adapter / "adapter_model.safetensors")
    code, out = generate(adapter)
    assert_refused(code, out, str(adapter / "adapter_model.safetensors"), "not a readable safetensors file")


def test_damaged_full_model_safetensors_named(full):
    _truncate(full / "model.safetensors")
    code, out = generate(full)
    assert_refused(code, out, str(full / "model.safetensors"), "incomplete")


def test_sharded_index_with_a_missing_shard_named(tmp_path, tiny_model, base):
    (base / "model.safetensors").rename(base / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, out = lint_with_model(tmp_path, tiny_model, str(base))
    assert_refused(code, out, "model-00002-of-00002.safetensors", "missing")


def test_no_weights_at_all_named(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    code, out = generate(adapter)
    assert_refused(code, out, str(adapter), "no weights: expected adapter_model.safetensors")


GGUF = {
    "garbage": (b"hello, this is not a GGUF file at all\n" * 10, "not a GGUF file"),
    "empty": (b"", "empty (0 bytes)"),
    "header cut short": (b"GGUF" + struct.pack("<I", 3), "cut short"),
    # the magic, then counts that send the parser past the end of the file (gguf raises struct.error)
    "impossible counts": (b"GGUF" + struct.pack("<IQQ", 3, 5, 99) + b"\x01" * 20, "could not read this GGUF file"),
    # a well-formed empty header: transformers' ValueError (no architecture)
    "no metadata": (b"GGUF" + struct.pack("<IQQ", 3, 0, 0), "could not read this GGUF file"),
}


@pytest.mark.parametrize("case", sorted(GGUF))
def test_damaged_gguf_named(tmp_path, tiny_model, case):
    data, fragment = GGUF[case]
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(data)
    code, out = lint_with_model(tmp_path, tiny_model, str(gguf))
    assert_refused(code, out, f"model.name: {gguf}", fragment)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_config_json_not_json_named(tmp_path, tiny_model, base):
    (base / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 32,,\n')
    code, out = lint_with_model(tmp_path, tiny_model, str(base))
    assert_refused(code, out, f"{base / 'config.json'}:2", "not valid JSON")


def test_full_model_config_json_not_json_named(full):
    (full / "config.json").write_text("not json")
    code, out = generate(full)
    assert_refused(code, out, f"{full / 'config.json'}:1", "not valid JSON")


def test_adapter_config_json_not_json_named(adapter):
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"')
    code, out = generate(adapter)
    assert_refused(code, out, f"{adapter / 'adapter_config.json'}:1", "not valid JSON")


# -- instructune.json --------------------------------------------------------------------------------------------


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "instructune.json").read_text())


def _drop(key: str):
    def change(meta: dict) -> dict:
        del meta[key]
        return meta
    return change


MANIFESTS = {
    "missing tasks": (_drop("tasks"), "instructune.json: tasks", "'tasks' is missing"),
    "missing config": (_drop("config"), "instructune.json: config", "'config' is missing"),
    "missing chat_template": (_drop("chat_template"), "instructune.json: chat_template", "missing"),
    "config without model": (lambda m: {**m, "config": {}}, "instructune.json: config.model", "missing"),
    "model name not a string": (lambda m: {**m, "config": {**m["config"], "model": {"name": 5}}},
                                "instructune.json: config.model.name", "string"),
    "tasks a list": (lambda m: {**m, "tasks": []}, "instructune.json: tasks", "JSON object"),
    "no tasks": (lambda m: {**m, "tasks": {}}, "instructune.json: tasks", "no tasks"),
    "a list, not an object": (lambda m: [m], "instructune.json", "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_incomplete_manifest_named(adapter, case):
    change, where, fragment = MANIFESTS[case]
    (adapter / "instructune.json").write_text(json.dumps(change(_manifest(adapter))))
    code, out = generate(adapter)
    assert_refused(code, out, str(adapter / where), fragment)


@pytest.mark.parametrize("text, where", [('{"tasks": {}, \n"config": ', "instructune.json:2"),
                                         ("", "instructune.json:1"),
                                         ("garbage", "instructune.json:1")])
def test_manifest_not_json_named(adapter, text, where):
    (adapter / "instructune.json").write_text(text)
    code, out = generate(adapter)
    assert_refused(code, out, str(adapter / where), "not valid JSON")


def test_manifest_not_utf8_named(adapter):
    (adapter / "instructune.json").write_bytes(b'{"tasks": "\xff\xfe"}')
    with pytest.raises(InstructuneError, match=r"not UTF-8 text \(byte 11\)") as e:
        Manifest.read(adapter)
    assert e.value.where == str(adapter / "instructune.json")


def test_intact_model_still_loads(trained):
    """The checks refuse only what is wrong: the trained folder loads and answers."""
    model, tokenizer, meta = load_finetuned(trained)
    assert TASK in meta.task_names() and tokenizer.pad_token_id is not None
    assert check_model_folder(trained) == trained
    code, out = generate(trained)
    assert code == 0, out


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_tokenizer_file_not_json_named(tmp_path, tiny_model, base, name):
    (base / name).write_text('{"version": "1.0", garbage')
    code, out = lint_with_model(tmp_path, tiny_model, str(base))
    assert_refused(code, out, f"{base / name}:1", "not valid JSON")
