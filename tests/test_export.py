"""Export on tiny random models: merged weights equal the adapter's, a GGUF carries the chat template, end ids and
task templates, an Ollama TEMPLATE renders the training prompt, and every refusal names its reason (per architecture,
the GGUF read back by transformers and by real llama.cpp: test_export_arch.py)."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tiny_model, tiny_config, write_config
from instructune.cli import app
from instructune.errors import InstructuneError
from instructune.export import (export_gguf, export_merged, gguf_outputs, ollama_prompt, parity, parity_report,
                                render_go_template, write_modelfile)
from instructune.export.gotemplate import go_template
from instructune.export.source import full_precision_model
from instructune.manifest import MANIFEST, Manifest
from instructune.models import load_model
from instructune.prompts import PromptFormat, TaskTemplate
from instructune.prompts.library import LIBRARY

PROMPTS = ["my parcel is late", "I was charged twice on my invoice", "the app crashes when I log in"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("export-run")
    cfg = tiny_config(tmp, tiny_model, ("classification",), epochs=1, lr=5e-3)
    cfg["baseline"] = {"enabled": False}
    result = CliRunner().invoke(app, ["run", str(write_config(tmp, cfg))])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def _manifest(run):
    return json.loads((run / "model" / MANIFEST).read_text())


def _gemma_base(path, layer_types):
    """A tiny Gemma 3 whose end of turn (<|im_end|>) is not its EOS (<|endoftext|>), as in the real Gemma. Its head_dim
    is Gemma 3's 256: transformers reads a Gemma 3 GGUF back with query_pre_attn_scalar 256 (the file has no key for
    it), and llama.cpp scales queries by 1/sqrt(head_dim), so only head_dim 256 round-trips both ways."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    build_tiny_model(path, chat=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.eos_token = "<|endoftext|>"
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (path / name).unlink(missing_ok=True)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=8, layer_types=layer_types, max_position_embeddings=1024,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Gemma3ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _adapter_run(tmp, base, manifest):
    """A model folder as `instructune train` writes it, with a random (non-zero) LoRA adapter on `base`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    out = tmp / "run" / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / MANIFEST).write_text(json.dumps({**manifest, "base_model": str(base)}))
    return tmp / "run"


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory, tiny_run):
    tmp = tmp_path_factory.mktemp("export-gemma")
    base = _gemma_base(tmp / "base", ["sliding_attention"] * 5 + ["full_attention"])
    return _adapter_run(tmp, base, _manifest(tiny_run))


def _encode(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _chat_prompts(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "model")
    return tok, [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 for p in PROMPTS]


@torch.no_grad()
def _logits(model, ids):
    return [model(torch.tensor([i])).logits[0] for i in ids]


@torch.no_grad()
def _greedy(model, ids, n=8):
    # end tokens disabled: every prompt yields n tokens to compare
    return [model.generate(torch.tensor([i]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(i):].tolist() for i in ids]


def test_merged_equals_adapter_logits_and_carries_template_end_tokens_and_card(tmp_path, tiny_run):
    from transformers import AutoModelForCausalLM

    out = export_merged(tiny_run, tmp_path / "merged")
    tok, texts = _chat_prompts(tiny_run)
    ids = _encode(tok, texts)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    cfg = _manifest(tiny_run)["config"]["model"]
    from instructune.config import ModelConfig

    peft = load_model(str(tiny_run / "model"), ModelConfig(**cfg)).eval()  # base + adapter, not merged
    base = load_model(_manifest(tiny_run)["base_model"], ModelConfig(**cfg)).eval()
    for m, p, b in zip(_logits(merged, ids), _logits(peft, ids), _logits(base, ids)):
        assert (m - p).abs().max().item() < 1e-4
        assert (p - b).abs().max().item() > 1e-3  # the adapter changes the model: the test can fail
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert im_end in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int) else gen["eos_token_id"])
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert json.loads((out / MANIFEST).read_text()) == _manifest(tiny_run)
    card = (out / "README.md").read_text()
    assert _manifest(tiny_run)["data_fingerprint"] in card
    assert "| tiny_classification | accuracy |" in card
    assert "Text: <your text here><|im_end|>\n<|im_start|>assistant\n" in card
    # bf16 export: same folder replaced whole (it is an export's own folder)
    export_merged(tiny_run, out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_gguf_holds_chat_template_end_ids_and_task_templates(tmp_path, tiny_run, gemma_run):
    from transformers import AutoTokenizer

    path = export_gguf(gemma_run, tmp_path / "g.gguf", "q8_0")
    reader = gguf.GGUFReader(path)

    def value(key):
        return reader.fields[key].contents()

    tok = AutoTokenizer.from_pretrained(gemma_run / "model")
    assert value("general.architecture") == "gemma3"
    assert value("tokenizer.chat_template") == tok.chat_template
    assert value("tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|endoftext|>")
    assert value("tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert sorted(value("instructune.end_token_ids")) == sorted(tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
    assert json.loads(value("instructune.tasks")) == _manifest(tiny_run)["tasks"]
    assert value("instructune.chat_template_used") is True
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    # Gemma's norms are stored with the +1 llama.cpp expects
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    assert abs(float(norm.data.mean()) - 1.0) < 1e-6  # a fresh Gemma3RMSNorm weight is 0: stored as 1


def _messages(system, user):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def test_modelfile_template_renders_exactly_the_training_prompt(tmp_path, tiny_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_run / "model")
    manifest = _manifest(tiny_run)
    fmt = PromptFormat(tok, True)
    chat = ollama_prompt(tok, Manifest.model_validate(manifest))
    for system in (None, "You label support tickets."):
        assert render_go_template(chat.template, system, "Where is my order?") == \
            fmt.prompt_text(_messages(system, "Where is my order?"))
    # --task: the user's text goes through the task's training template
    template = TaskTemplate.from_dict(manifest["tasks"]["tiny_classification"])
    wrapped = ollama_prompt(tok, Manifest.model_validate(manifest), "tiny_classification")
    from instructune.data.load import Record

    training = fmt.prompt_text(template.prompt_only(Record({"text": "my parcel is late"})))
    assert render_go_template(wrapped.template, wrapped.system, "my parcel is late") == training
    assert wrapped.stops == ["<|im_end|>"]
    # a plain (non-chat) model: the plain format with the task's separator, and the evaluation's cut at a blank line
    plain_manifest = {**manifest, "chat_template": False}
    plain = ollama_prompt(tok, Manifest.model_validate(plain_manifest), "tiny_classification")
    plain_fmt = PromptFormat(tok, False, template.separator)
    assert render_go_template(plain.template, None, "my parcel is late") == \
        plain_fmt.prompt_text(template.prompt_only(Record({"text": "my parcel is late"})))
    assert "\n\n" in plain.stops
    # the Modelfile itself
    export_gguf(tiny_run, tmp_path / "ollama" / "model.gguf")
    text = write_modelfile(tiny_run, tmp_path / "ollama" / "model.gguf", tmp_path / "ollama",
                           task="tiny_classification").read_text()
    assert text.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"")
    assert f'TEMPLATE """{wrapped.template}"""' in text and 'PARAMETER stop "<|im_end|>"' in text


def test_go_template_for_a_gemma_style_template_and_the_evaluator():
    def gemma(system, user):  # Gemma puts the system prompt at the start of the first user turn
        return f"<bos><start_of_turn>user\n{system + chr(10) * 2 if system else ''}{user}<end_of_turn>\n<start_of_turn>model\n"

    template = go_template(gemma, "Summarize: ", ".")
    assert template == ("<bos><start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}Summarize: {{ .Prompt }}."
                        "<end_of_turn>\n<start_of_turn>model\n")
    assert render_go_template("{{ if .System }}S={{ .System }};{{ else }}none;{{ end }}{{ .Prompt }}", "", "p") == "none;p"
    with pytest.raises(InstructuneError, match="beyond"):
        render_go_template("{{ range .Messages }}{{ end }}", None, "x")
    with pytest.raises(InstructuneError, match="system prompt before one user message"):
        go_template(lambda s, u: u + u)


def test_parity_of_the_gguf_on_the_runs_test_prompts(tmp_path, tiny_run):
    assert parity(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == {"n": 4, "identical": 3, "share_identical": 0.75}
    path = export_gguf(tiny_run, tmp_path / "m.gguf")
    outputs = gguf_outputs(tiny_run, path, limit=3)
    report = parity_report(tiny_run, outputs, limit=3)["tiny_classification"]
    assert report["n"] == 3 and report["share_identical"] == 1.0 and report["metric"] == "accuracy"
    assert report["exported"] == report["reference"]


def test_refusals(tmp_path, tiny_run, tiny_gemma):
    empty = tmp_path / "empty-run"
    (empty / "model").mkdir(parents=True)
    with pytest.raises(InstructuneError, match="no fine-tuned model here"):
        export_merged(empty, tmp_path / "out")
    no_weights = tmp_path / "no-weights" / "model"
    no_weights.mkdir(parents=True)
    shutil.copy(tiny_run / "model" / MANIFEST, no_weights / MANIFEST)
    with pytest.raises(InstructuneError, match="has no weights"):
        export_gguf(no_weights, tmp_path / "x.gguf")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InstructuneError, match="holds other files"):
        export_merged(tiny_run, busy)
    with pytest.raises(InstructuneError, match="holds other files"):
        (tmp_path / "elsewhere.gguf").write_bytes(b"GGUF")
        write_modelfile(tiny_run, tmp_path / "elsewhere.gguf", busy)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(InstructuneError, match="not written by `instructune export`"):
        (busy / "other.gguf").write_bytes(b"not ours")
        export_gguf(tiny_run, busy / "other.gguf")
    # an architecture without a GGUF path names the supported ones (each is tested in test_export_arch.py)
    other = tmp_path / "neox"
    shutil.copytree(_manifest(tiny_run)["base_model"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    shutil.copytree(tiny_run / "model", tmp_path / "m2" / "model")
    (tmp_path / "m2" / "model" / MANIFEST).write_text(json.dumps({**_manifest(tiny_run), "base_model": str(other)}))
    with pytest.raises(InstructuneError, match=r"'GPTNeoXForCausalLM'.*supported: \['Gemma3ForCausalLM', "
                       r"'LlamaForCausalLM', 'MistralForCausalLM', 'Phi3ForCausalLM', 'Qwen2ForCausalLM', "
                       r"'Qwen3ForCausalLM'\]"):
        export_gguf(tmp_path / "m2", tmp_path / "x.gguf")
    # a Gemma 3 whose attention layout llama.cpp would not reproduce
    gemma = _adapter_run(tmp_path / "g", tiny_gemma, _manifest(tiny_run))
    with pytest.raises(InstructuneError, match="five sliding-window layers"):
        export_gguf(gemma, tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()
    # --task on a task with two input fields
    manifest = _manifest(tiny_run)
    qa = TaskTemplate(task="qa", type="qa", template=LIBRARY["qa/read-answer"], fields={}, variables={})
    manifest["tasks"]["qa"] = qa.to_dict()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_run / "model")
    with pytest.raises(InstructuneError, match="2 input fields"):
        ollama_prompt(tok, Manifest.model_validate(manifest), "qa")
    with pytest.raises(InstructuneError, match="unknown task"):
        ollama_prompt(tok, Manifest.model_validate(manifest), "nope")
