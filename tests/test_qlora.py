"""QLoRA (a 4-bit base under fp32 LoRA adapters) and the adapter variants (DoRA, rsLoRA, PiSSA, OLoRA) on tiny random
Llamas, on the CPU: QLoRA trains, saves a standard PEFT adapter on the original base, is evaluated as it was trained
and resumes exactly after a SIGKILL; every variant merges into the original full-precision weights (merged logits =
the adapter's); the memory plan's 4-bit accounting equals what bitsandbytes holds; bad settings are refused by key."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import BLOCK_AFTER_CHECKPOINT, tiny_config, write_config
from instructune.cli import app
from instructune.config import ExperimentConfig, load_config
from instructune.errors import InstructuneError
from instructune.models import (count_parameters, hf_config, load_for_inference, load_model, quiet_peft,
                                save_model, training_model)
from instructune.tasks import manifest, prepare
from instructune.train import memory
from instructune.train.loop import train

needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="QLoRA needs bitsandbytes (`pip install 'instructune[qlora]'`)")
TOKENS = [[5, 17, 42, 99, 7, 250, 3, 61], [8, 8, 120, 33, 71, 5]]


def _prepared(tmp_path, tiny_model, n_train=8, **train_cfg):
    cfg = ExperimentConfig.model_validate(tiny_config(tmp_path, tiny_model, ("classification",), n_train=n_train,
                                                      **train_cfg))
    prep = prepare(cfg)
    return cfg, prep, [e for t in prep.tasks for e in t.encoded("train", cfg.train.max_length)]


def _trained(tmp_path, tiny_model, n_train=8, **train_cfg):
    """A model trained in this process (eval mode), the folder `save_model` wrote it to, and the training log."""
    cfg, prep, examples = _prepared(tmp_path, tiny_model, n_train, **train_cfg)
    torch.manual_seed(0)
    model = training_model(prep.model_source, cfg.model, cfg.train)
    log = train(model, examples, [], cfg.train, prep.tokenizer.pad_token_id, cfg.seed)
    out = tmp_path / "model"
    save_model(model, prep.tokenizer, out, manifest(prep, {}))
    return model.eval(), out, log


@torch.no_grad()
def _logits(model):
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in TOKENS]


def _assert_same_logits(a, b, tol):
    for x, y in zip(_logits(a), _logits(b)):
        assert (x - y).abs().max().item() <= tol * max(1.0, y.abs().max().item())


def _four_bit(model) -> list[str]:
    """The names of bitsandbytes' 4-bit linear layers (peft's LoRA layer around one has the same class name)."""
    return sorted(n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")
                  and type(m).__name__ == "Linear4bit")


# -- QLoRA end to end: `instructune run` -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model):
    """20 optimizer steps of QLoRA (16 examples, batch 4, 5 epochs) through the CLI; the run folder."""
    tmp = tmp_path_factory.mktemp("qlora-run")
    cfg = tiny_config(tmp, tiny_model, ("classification",), n_train=16, method="qlora", epochs=5, lr=1e-2)
    cfg["baseline"] = {"enabled": False}
    result = CliRunner().invoke(app, ["train", str(write_config(tmp, cfg))])
    assert result.exit_code == 0, result.output
    return tmp / "run"


@needs_bitsandbytes
def test_qlora_trains_and_saves_a_standard_peft_adapter_on_the_original_base(qlora_run, tiny_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    losses = [json.loads(line)["loss"] for line in (qlora_run / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and sum(losses[-4:]) < 0.97 * sum(losses[:4])  # the loss falls (5.90 to 5.6 here)
    model_dir = qlora_run / "model"
    settings = json.loads((model_dir / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and settings["base_model_name_or_path"] == str(tiny_model)
    assert "quantization_config" not in json.dumps(settings)  # nothing ties it to the 4-bit load
    weights = load_file(str(model_dir / "adapter_model.safetensors"))
    assert weights and all(("lora_A" in k or "lora_B" in k) and v.dtype == torch.float32 for k, v in weights.items())
    assert json.loads((model_dir / "instructune.json").read_text())["method"] == "qlora"
    with quiet_peft():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(model_dir))
    assert not _four_bit(adapted)  # plain peft on the plain base: a standard adapter


@needs_bitsandbytes
def test_the_evaluate_stage_scores_a_qlora_run_and_the_report_says_how(qlora_run):
    result = CliRunner().invoke(app, ["evaluate", str(qlora_run.parent / "config.yaml")])
    assert result.exit_code == 0, result.output
    assert "tiny_classification" in json.loads((qlora_run / "finetuned.json").read_text())
    result = CliRunner().invoke(app, ["report", str(qlora_run.parent / "config.yaml")])
    assert result.exit_code == 0, result.output
    assert "evaluated as trained: the base in 4 bits with the adapter on top" in (qlora_run / "report.md").read_text()


@needs_bitsandbytes
def test_a_qlora_model_is_evaluated_as_it_was_trained(tmp_path, tiny_model):
    """The saved folder loads back as the 4-bit base with the adapter unmerged: the logits of the model as it ended
    training, not of a merge (which would round the update into the 4-bit weights)."""
    model, out, _ = _trained(tmp_path, tiny_model, method="qlora", epochs=1, lr=1e-2)
    loaded = load_for_inference(str(out), load_config(write_config(tmp_path, tiny_config(tmp_path, tiny_model))).model)
    assert _four_bit(loaded) and _four_bit(loaded) == _four_bit(model)
    assert any("lora_A" in n for n, _ in loaded.named_parameters())  # not merged
    _assert_same_logits(loaded, model, 1e-5)


@needs_bitsandbytes
def test_merged_export_merges_into_the_original_full_precision_weights(qlora_run, tiny_model, tmp_path):
    """The merge reloads the base unquantized: merged weight - original weight is exactly the adapter's update (a
    merge into dequantized 4-bit weights would be off by their rounding, ~1e-2 here), and the merged model's
    logits are the fp32 base + adapter's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from instructune.export import export_merged

    merged = AutoModelForCausalLM.from_pretrained(export_merged(qlora_run, tmp_path / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with quiet_peft():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(qlora_run / "model"))
    _assert_same_logits(merged, adapted.eval(), 1e-4)
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    update = layer.get_delta_weight("default")
    moved = merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    assert update.abs().max() > 1e-3 and (moved - update).abs().max() < 1e-6


@needs_bitsandbytes
def test_gguf_export_of_a_qlora_run(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from instructune.export import export_gguf, export_merged

    path = export_gguf(qlora_run, tmp_path / "m.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(export_merged(qlora_run, tmp_path / "merged")).eval()
    _assert_same_logits(back, merged, 1e-4)


@needs_bitsandbytes
def test_qlora_resumes_bit_identically_after_sigkill(tmp_path, tiny_model):
    """The 4-bit base is quantized again on resume, identically: the resumed losses equal the uninterrupted run's."""
    common = dict(method="qlora", epochs=1, batch_size=4, save_every=1, lora={"dropout": 0.1})
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cli = [sys.executable, "-m", "instructune.cli", "train"]
    whole = write_config(tmp_path, tiny_config(tmp_path / "a", tiny_model, n_train=24, **common), "whole.yaml")
    subprocess.run([*cli, str(whole)], check=True, env=env, capture_output=True)
    expected = [json.loads(line)["loss"] for line in open(tmp_path / "a" / "run" / "train_log.jsonl")]
    config = write_config(tmp_path, tiny_config(tmp_path / "b", tiny_model, n_train=24, **common), "cut.yaml")
    marker, wrapper = tmp_path / "checkpoint-3-written", tmp_path / "block.py"
    wrapper.write_text(BLOCK_AFTER_CHECKPOINT)
    proc = subprocess.Popen([sys.executable, str(wrapper), "3", str(marker), str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists() and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run([*cli, str(config), "--resume"], check=True, env=env, capture_output=True)
    resumed = [json.loads(line)["loss"] for line in open(tmp_path / "b" / "run" / "train_log.jsonl")]
    assert len(expected) == 6 and resumed == expected


# -- adapter variants ------------------------------------------------------------------------------------------
VARIANTS = [{"variant": "dora"}, {"variant": "rslora"}, {"init": "pissa"}, {"init": "olora"},
            {"variant": "rslora", "init": "pissa"}, {"modules_to_save": ["lm_head"], "target_modules": ["q_proj", "v_proj"]}]


@pytest.mark.parametrize("lora", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_each_variant_trains_saves_on_the_original_base_and_merges(tmp_path, tiny_model, lora):
    """The adapter as saved, on the original base, gives the trained model's logits (PiSSA/OLoRA: converted from
    factors of a modified base to a plain LoRA of rank 2r); merged export gives the same (a DoRA merge rescales
    each output by its trained magnitude: not a LoRA merge)."""
    from transformers import AutoModelForCausalLM

    from instructune.export import export_merged

    model, out, log = _trained(tmp_path, tiny_model, lr=1e-2, lora={"r": 4, "alpha": 8, **lora})
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["use_dora"] == (lora.get("variant") == "dora")
    assert settings["use_rslora"] == (lora.get("variant") == "rslora")
    assert settings["init_lora_weights"] is True and settings["r"] == (8 if "init" in lora else 4)
    mcfg = load_config(write_config(tmp_path, tiny_config(tmp_path, tiny_model))).model
    adapted = load_model(str(out), mcfg).eval()  # the saved adapter on the original base, not merged
    _assert_same_logits(adapted, model, 1e-4)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(out, tmp_path / "merged")).eval()
    _assert_same_logits(merged, adapted, 1e-4)


@needs_bitsandbytes
def test_dora_on_a_4_bit_base_trains_and_merges_into_the_original_weights(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    from instructune.export import export_merged

    _, out, log = _trained(tmp_path, tiny_model, method="qlora", lr=1e-2, lora={"r": 4, "variant": "dora"})
    mcfg = load_config(write_config(tmp_path, tiny_config(tmp_path, tiny_model))).model
    plain = load_model(str(out), mcfg).eval()  # fp32 base + the DoRA adapter
    merged = AutoModelForCausalLM.from_pretrained(export_merged(out, tmp_path / "merged")).eval()
    _assert_same_logits(merged, plain, 1e-4)


# -- the memory plan's 4-bit accounting ----------------------------------------------------------------------
@needs_bitsandbytes
@pytest.mark.parametrize("settings", [{}, {"quant_type": "fp4", "double_quant": False, "bf16": True}],
                         ids=["nf4-double", "fp4-bf16"])
def test_planned_4_bit_state_equals_the_bytes_training_holds(tmp_path, tiny_model, settings):
    """Weights (packed 4-bit data, every quantization constant, the non-quantized rest, the adapter), gradients and
    optimizer state as planned, to the byte, against the tensors held after training; the layers the plan takes as
    4-bit are the ones bitsandbytes replaced, and the weight counts match."""
    cfg, prep, examples = _prepared(tmp_path, tiny_model, method="qlora", epochs=0.5, **settings)
    shape = memory.model_shape(hf_config(prep.model_source, cfg.model), "qlora", cfg.train.lora)
    plan = memory.footprint(shape, "ddp", 1, 64, 8, **memory.plan_options(cfg.train))
    model = training_model(prep.model_source, cfg.model, cfg.train)
    measured = {}
    train(model, examples, [], cfg.train, prep.tokenizer.pad_token_id, cfg.seed, measured=measured)
    for part in ("weights", "gradients", "optimizer"):
        assert measured[part] == [plan.parts[part]], part
    quantized = [model.get_submodule(n).weight.quant_state.shape.numel() for n in _four_bit(model)]
    assert sorted(shape.quantized) == sorted(quantized) and len(quantized) == 14  # 7 linears in each of 2 layers
    assert count_parameters(model) == (shape.trainable, shape.parameters)


def test_4_bit_bytes_follow_bitsandbytes_layout():
    # 4096 values: 2048 bytes packed, 64 blocks; scales fp32 (256 B), or 1 byte each + 1 fp32 + offset + 1 KiB code
    assert memory.four_bit_bytes(4096, double_quant=False) == 2048 + 64 + 64 * 4
    assert memory.four_bit_bytes(4096, double_quant=True) == 2048 + 64 + 64 + 4 + 4 + 1024
    big = 4096 * 4096
    assert memory.four_bit_bytes(big, True) / (big * 2) < 0.27  # against bf16: 4.13 bits a weight, not 16
    shape = memory.Shape(parameters=1100, trainable=100, root=100, layer=500, layers=2, hidden=8, mlp=16, vocab=50,
                         quantized=(400, 400, 200))
    qlora = memory.footprint(shape, "ddp", 1, 64, 8, method="qlora", double_quant=False)
    assert qlora.parts["weights"] == 100 * 4 + 2 * memory.four_bit_bytes(400, False) + memory.four_bit_bytes(200, False)
    # on a CPU the process keeps what it read before quantizing (fp32, bf16 under train.bf16); a CUDA peak does not
    assert qlora.parts["loading"] == 1000 * 4
    assert memory.footprint(shape, "ddp", 1, 64, 8, method="qlora", bf16=True).parts["loading"] == 1000 * 2
    assert memory.footprint(shape, "ddp", 1, 64, 8, method="qlora", device="cuda").parts["loading"] == 0
    assert memory.footprint(shape, "ddp", 1, 64, 8, method="lora").parts["loading"] == 0


# -- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key, words", [
    ("train.lora.variant=lorax", "train.lora.variant", "dora"),
    ("train.lora.init=svd", "train.lora.init", "pissa"),
    ("train.method=qlora4", "train.method", "qlora"),
    ("train.quant_type=int8", "train.quant_type", "nf4"),
    ("train.lora.init=pissa", "train", "not supported with method: qlora"),
])
def test_bad_adapter_settings_are_refused_naming_the_key(tmp_path, tiny_model, override, key, words):
    cfg = tiny_config(tmp_path, tiny_model, method="qlora")
    with pytest.raises(InstructuneError) as e:
        load_config(write_config(tmp_path, cfg), [override])
    assert f"({key})" in e.value.where and words in str(e.value)


@pytest.mark.parametrize("train", [{"method": "qlora"}, {"lora": {"init": "pissa"}}])
def test_what_fsdp_cannot_shard_is_refused_with_the_config_and_under_an_accelerate_fsdp_launch(tmp_path, tiny_model,
                                                                                               monkeypatch, train):
    from instructune.config import TrainConfig
    from instructune.train import fsdp

    with pytest.raises(InstructuneError, match="not supported with strategy: fsdp") as e:
        load_config(write_config(tmp_path, tiny_config(tmp_path, tiny_model, strategy="fsdp", **train)))
    assert "(train)" in e.value.where
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # sharding asked for by the launcher, not the config
    cfg = TrainConfig(**train)
    assert fsdp.wanted(cfg, 2)
    with pytest.raises(InstructuneError, match="not supported with strategy: fsdp"):
        fsdp.check_supported(None, cfg, None)


def test_pissa_with_dora_is_refused(tmp_path, tiny_model):
    with pytest.raises(InstructuneError, match="cannot be combined with variant: dora") as e:
        load_config(write_config(tmp_path, tiny_config(tmp_path, tiny_model, lora={"init": "pissa", "variant": "dora"})))
    assert "(train.lora)" in e.value.where


def test_qlora_without_bitsandbytes_names_the_install_command(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails as if not installed
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, method="qlora"))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 2, result.output
    assert "pip install 'instructune[qlora]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "model").exists()
