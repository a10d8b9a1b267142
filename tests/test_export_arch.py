"""Export per architecture (Llama, Gemma 3, Qwen 2.5, Qwen 3, Mistral, Phi-3), each a tiny random model built here
with a tokenizer of its family's kind (byte-level with Qwen's split; SentencePiece-style BPE for Mistral and Phi-3) and
its family's real chat template (tests/chat_templates: Qwen2.5-7B-Instruct, Qwen3-0.6B, Mistral-Nemo-Instruct-2407
and Phi-3.5-mini-instruct's, as llama.cpp keeps them in models/templates): the merged model equals the
adapter, the GGUF read back by transformers answers the same greedy tokens, the Ollama TEMPLATE renders the training
prompt, and, where llama-cpp-python is installed, real llama.cpp loads each GGUF, tokenizes the chat prompts to the
same ids and gives the same next-token logits. K-quants: made by llama.cpp's quantizer, refused without it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf
import pytest
import torch
from typer.testing import CliRunner

from conftest import CORPUS, build_tiny_model
from test_export import PROMPTS, _adapter_run, _encode, _gemma_base, _greedy, _logits
from instructune.cli import app
from instructune.config import ModelConfig
from instructune.data.load import Record
from instructune.errors import InstructuneError
from instructune.export import export_gguf, export_merged, ollama_prompt, render_go_template
from instructune.export.source import full_precision_model
from instructune.export.vocab import TEKKEN_SPLIT, byte_level_pre
from instructune.manifest import Manifest
from instructune.models import load_model
from instructune.prompts import PromptFormat, TaskTemplate
from instructune.prompts.library import LIBRARY

TEMPLATES = Path(__file__).parent / "chat_templates"
NEW_ARCHS = ["qwen2", "qwen3", "mistral", "phi3"]
ARCHS = ["llama", "gemma3", *NEW_ARCHS]
SPIECE = "\u2581"
SYSTEM = "You label support tickets."


def _byte_level(specials, split=None):
    """Byte-level BPE; `split`: a regex split before the bytes (Qwen's), else GPT-2's own."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    if split:
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def _sentencepiece(specials, added=(), bos=True):
    """SentencePiece-style BPE as Llama 2, Mistral and Phi-3 ship it in tokenizer.json: '▁' for spaces prepended by
    the normalizer (after every special token, as llama.cpp does), <0xXX> byte fallback, <unk>/<s>/</s> first and
    the chat tokens `added` last."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE), normalizers.Replace(" ", SPIECE)])
    tk.pre_tokenizer = pre_tokenizers.Split(SPIECE, "merged_with_next")  # words, for training only
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials + byte_tokens))
    tj = json.loads(tk.to_str())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in byte_tokens]  # bytes are vocabulary
    tj["pre_tokenizer"] = None
    tk = Tokenizer.from_str(json.dumps(tj))
    tk.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(list(added))
    if bos:
        from tokenizers.processors import TemplateProcessing

        tk.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tk


def _tokenizer(arch):
    """A tokenizer of the family's kind, with the family's chat template."""
    from transformers import PreTrainedTokenizerFast

    from instructune.export.vocab import QWEN2_SPLIT

    if arch in ("qwen2", "qwen3"):
        tok = PreTrainedTokenizerFast(tokenizer_object=_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                                   QWEN2_SPLIT),
                                      eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.chat_template = (TEMPLATES / ("qwen2.5.jinja" if arch == "qwen2" else "qwen3.jinja")).read_text()
    elif arch == "mistral":
        tok = PreTrainedTokenizerFast(tokenizer_object=_sentencepiece(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]),
                                      bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        tok.chat_template = (TEMPLATES / "mistral-nemo.jinja").read_text()
    else:  # phi3: the chat tokens after the vocabulary, <|endoftext|> the EOS, <|end|> the end of a turn
        chat = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]
        tok = PreTrainedTokenizerFast(tokenizer_object=_sentencepiece(["<unk>", "<s>", "</s>"], chat, bos=False),
                                      bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
                                      pad_token="<|endoftext|>")
        tok.chat_template = (TEMPLATES / "phi-3.5.jinja").read_text()
    return tok


def _randomise(model, scale=0.3):
    """Biases and norm weights start at 0 and 1: move them, so a wrongly mapped one changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * scale)


def _config(arch, tok):
    from transformers import MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    if arch == "qwen2":  # Qwen 2.5: biases on q/k/v, tied embeddings (0.5B-3B)
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":  # q/k norms; head_dim 128 (Qwen 3's, not hidden/heads), tied (0.6B-4B)
        return Qwen3Config(**common, head_dim=128, tie_word_embeddings=True)
    if arch == "mistral":  # its sliding window is metadata here (longer than the context: no window in effect)
        return MistralConfig(**common, head_dim=8, sliding_window=4096, tie_word_embeddings=False)
    return Phi3Config(**common, original_max_position_embeddings=1024, sliding_window=None, tie_word_embeddings=False)


def build_base(path: Path, arch: str) -> Path:
    """A tiny random base model of the architecture, saved as from the hub (safetensors, tokenizer, template)."""
    from transformers import AutoModelForCausalLM

    if arch == "llama":
        return build_tiny_model(path, chat=True)
    if arch == "gemma3":
        return _gemma_base(path, ["sliding_attention"] * 5 + ["full_attention"])
    tok = _tokenizer(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, tok))
    _randomise(model)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def manifest_for(base: Path, system: str | None = SYSTEM) -> dict:
    """The manifest `instructune train` writes, for one classification task trained through the chat template."""
    template = TaskTemplate(task="tickets", type="classification", template=LIBRARY["classification/choices"],
                            fields={}, variables={}, choices=["billing", "delivery", "technical"], system_prompt=system)
    return {"version": 1, "base_model": str(base), "method": "lora", "chat_template": True,
            "tasks": {"tickets": template.to_dict()}, "data_fingerprint": "test",
            "config": {"model": ModelConfig(name=str(base)).model_dump(mode="json")}}


@pytest.fixture(scope="module")
def arch_run(tmp_path_factory):
    """arch -> a run folder with a random LoRA adapter on that architecture's tiny base (built once per module)."""
    runs = {}

    def get(arch):
        if arch not in runs:
            tmp = tmp_path_factory.mktemp(f"arch-{arch}")
            base = build_base(tmp / "base", arch)
            runs[arch] = _adapter_run(tmp, base, manifest_for(base))
        return runs[arch]
    return get


def _chat_ids(run):
    """The tokenizer saved with the model and the task's chat prompts as training tokenized them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "model")
    fmt = PromptFormat(tok, True)
    texts = [fmt.prompt_text([{"role": "user", "content": p}]) for p in PROMPTS]
    return tok, texts, _encode(tok, texts)


@pytest.mark.parametrize("arch", NEW_ARCHS)  # Llama's: test_export.py; merging has nothing architecture-specific
def test_merged_equals_the_adapter(tmp_path, arch_run, arch):
    from transformers import AutoModelForCausalLM

    run = arch_run(arch)
    out = export_merged(run, tmp_path / "merged")
    _, _, ids = _chat_ids(run)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg = ModelConfig(**Manifest.read(run / "model").config["model"])
    adapter = load_model(str(run / "model"), cfg).eval()  # base + adapter, not merged
    base = load_model(cfg.name, cfg).eval()
    for m, a, b in zip(_logits(merged, ids), _logits(adapter, ids), _logits(base, ids)):
        assert (m - a).abs().max().item() < 1e-4
        assert (a - b).abs().max().item() > 1e-3  # the adapter changes the model: the test can fail
    assert json.loads((out / "config.json").read_text())["architectures"] == \
        json.loads((Path(cfg.name) / "config.json").read_text())["architectures"]


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_read_back_by_transformers_answers_the_same(tmp_path, arch_run, arch):
    """The f16 GGUF loaded by transformers (`gguf_file=`): same next-token logits within f16 rounding and the same
    greedy tokens as the evaluated (merged fp32) model, on the chat prompts as training tokenized them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = arch_run(arch)
    path = export_gguf(run, tmp_path / "m.gguf", "f16")
    ref = full_precision_model(run / "model", Manifest.read(run / "model"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    _, texts, ids = _chat_ids(run)
    if arch != "mistral":  # transformers rebuilds a `llama` vocabulary with Metaspace(prepend_scheme="first"): no '▁'
        # after [INST]; llama.cpp prefixes after every special token, as this tokenizer does (test below)
        assert _encode(AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name), texts) == ids
    for a, b in zip(_logits(ref, ids), _logits(back, ids)):
        assert (a - b).abs().max().item() < 2e-2
    assert _greedy(back, ids) == _greedy(ref, ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_real_llama_cpp_loads_each_architecture(tmp_path, arch_run, arch):
    """Real llama.cpp (llama-cpp-python: skipped where not installed) reads each export as it is: its metadata names
    (a wrong pre-tokenizer or key is a load failure), the same token ids for the chat prompts, and next-token logits
    within f16 rounding of the evaluated model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    run = arch_run(arch)
    path = export_gguf(run, tmp_path / "m.gguf", "f16")
    ref = full_precision_model(run / "model", Manifest.read(run / "model"))
    _, texts, ids = _chat_ids(run)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    for text, prompt, logits in zip(texts, ids, _logits(ref, ids)):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
        llm.reset()
        llm.eval(prompt)
        got = torch.tensor(llm.scores[len(prompt) - 1])
        assert (got - logits[-1]).abs().max().item() < 2e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_ollama_template_is_the_training_prompt_for_each_chat_template(arch_run, arch):
    from transformers import AutoTokenizer

    run = arch_run(arch)
    tok = AutoTokenizer.from_pretrained(run / "model")
    manifest = Manifest.read(run / "model")
    fmt = PromptFormat(tok, True)
    chat = ollama_prompt(tok, manifest)
    for system in (None, SYSTEM):
        for user in ("Where is my order?", "two\nlines"):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            assert chat.bos_added + render_go_template(chat.template, system, user) == fmt.prompt_text(messages)
    wrapped = ollama_prompt(tok, manifest, "tickets")  # --task: the user's text in the task's training prompt
    template = manifest.task_template("tickets")
    training = fmt.prompt_text(template.prompt_only(Record({"text": "my parcel is late"})))
    assert wrapped.bos_added + render_go_template(wrapped.template, wrapped.system, "my parcel is late") == training
    assert wrapped.system == SYSTEM and tok.decode([fmt.end_ids().pop()]) in wrapped.stops


def test_gguf_metadata_per_architecture(tmp_path, arch_run):
    """What llama.cpp's converter writes for each: architecture, pre-tokenizer, Qwen's biases, Qwen 3's norms and
    head size, Phi-3's fused tensors and context keys, Mistral's sliding window and permuted q/k."""
    expected = {"qwen2": ("qwen2", "gpt2", "qwen2"), "qwen3": ("qwen3", "gpt2", "qwen2"),
                "mistral": ("llama", "llama", "default"), "phi3": ("phi3", "llama", "default")}
    for arch, (name, model, pre) in expected.items():
        reader = gguf.GGUFReader(export_gguf(arch_run(arch), tmp_path / f"{arch}.gguf", "f32"))
        value = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.t")}
        tensors = {t.name for t in reader.tensors}
        assert (value["general.architecture"], value["tokenizer.ggml.model"], value["tokenizer.ggml.pre"]) == \
            (name, model, pre), arch
        assert ("output.weight" in tensors) == (arch in ("mistral", "phi3")), arch  # tied: no output tensor
    qwen2 = {t.name for t in gguf.GGUFReader(tmp_path / "qwen2.gguf").tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= qwen2
    qwen3 = gguf.GGUFReader(tmp_path / "qwen3.gguf")
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= {t.name for t in qwen3.tensors}
    assert qwen3.fields["qwen3.attention.key_length"].contents() == 128
    phi3 = gguf.GGUFReader(tmp_path / "phi3.gguf")
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= {t.name for t in phi3.tensors}
    assert "blk.0.ffn_gate.weight" not in {t.name for t in phi3.tensors}
    up = next(t for t in phi3.tensors if t.name == "blk.0.ffn_up.weight")
    assert list(up.shape) == [32, 128]  # gate and up stay fused: 2 x intermediate_size
    assert phi3.fields["phi3.rope.scaling.original_context_length"].contents() == 1024
    assert phi3.fields["phi3.attention.sliding_window"].contents() == 0
    mistral = gguf.GGUFReader(tmp_path / "mistral.gguf")
    assert mistral.fields["llama.attention.sliding_window"].contents() == 4096
    assert mistral.fields["tokenizer.ggml.add_bos_token"].contents() is True
    tekken = [{"type": "Split", "pattern": {"Regex": TEKKEN_SPLIT}}, {"type": "ByteLevel", "use_regex": False}]
    assert byte_level_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": tekken}}) == "tekken"  # Nemo's


def test_layouts_llama_cpp_would_compute_differently(tmp_path, arch_run, capsys):
    """A Qwen with sliding-window layers is refused (llama.cpp's Qwen attends to everything); a Mistral whose window
    is shorter than its context is exported with a warning that says from which prompt length answers differ."""
    run = arch_run("qwen2")
    base = Path(Manifest.read(run / "model").base_model)
    config = json.loads((base / "config.json").read_text())
    other = tmp_path / "qwen-swa"
    shutil.copytree(base, other)
    config.pop("layer_types")  # as on the hub: derived from use_sliding_window and max_window_layers
    (other / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 16,
                                                   "max_window_layers": 1}))
    swa = _adapter_run(tmp_path / "swa", other, manifest_for(other))
    with pytest.raises(InstructuneError, match=r"layers \[1\] .*sliding-window attention"):
        export_gguf(swa, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    mistral_base = Path(Manifest.read(arch_run("mistral") / "model").base_model)
    config = json.loads((mistral_base / "config.json").read_text())
    short = tmp_path / "mistral-window"
    shutil.copytree(mistral_base, short)
    (short / "config.json").write_text(json.dumps({**config, "sliding_window": 512}))
    export_gguf(_adapter_run(tmp_path / "short", short, manifest_for(short)), tmp_path / "w.gguf")
    assert "prompts longer than 512 tokens will be answered differently" in capsys.readouterr().err


def _hide_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError, as where missing


@pytest.mark.parametrize("dtype", ["q4_K_M", "q5_K_M", "q6_K"])
def test_k_quants_without_llama_cpp_are_refused_with_the_install_command(tmp_path, arch_run, monkeypatch, dtype):
    _hide_llama_cpp(monkeypatch)
    run = arch_run("llama")
    with pytest.raises(InstructuneError, match="pip install llama-cpp-python") as e:
        export_gguf(run, tmp_path / "q.gguf", dtype)
    assert e.value.where == "--dtype"
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(app, ["export", str(run), "--format", "ollama", "--dtype", dtype])
    assert result.exit_code == 2 and "--dtype" in result.output and "pip install llama-cpp-python" in result.output
    assert not (run / "export").exists()


@pytest.mark.parametrize("dtype", ["q4_k_m", "Q4_K_M", "q4_K_S", "q8_K", ""])
def test_unknown_gguf_types_are_refused_naming_the_option(tmp_path, arch_run, dtype):
    run = arch_run("llama")
    result = CliRunner().invoke(app, ["export", str(run), "--format", "gguf", "--dtype", dtype])
    assert result.exit_code == 2 and "--dtype" in result.output and "q4_K_M" in result.output, result.output
    assert not (run / "export").exists()


def _k_quant_base(path: Path) -> Path:
    """A Llama whose rows split into K-quants' 256-value blocks (hidden 256), so llama.cpp really writes Q4_K/Q6_K."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tiny_model(path, chat=True)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("dtype", ["q4_K_M", "q5_K_M", "q6_K"])
def test_k_quants_by_llama_cpp_keep_the_metadata_and_the_answers(tmp_path, dtype):
    """With llama-cpp-python: the file is llama.cpp's K-quant (its file type, Q4_K/Q5_K/Q6_K tensors), keeps the
    chat template and instructune's keys, loads in llama.cpp, and llama.cpp's next-token logits equal those of the
    same file dequantized by transformers (up to llama.cpp's 8-bit activations); a 4-bit random model is no closer
    to its fp32 self than about a fifth of its logits' range, so that is checked loosely."""
    from transformers import AutoModelForCausalLM

    llama_cpp = pytest.importorskip("llama_cpp")
    base = _k_quant_base(tmp_path / "base")
    run = _adapter_run(tmp_path, base, manifest_for(base))
    path = export_gguf(run, tmp_path / "k.gguf", dtype)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}")
    assert "instructune.tasks" in reader.fields and "tokenizer.chat_template" in reader.fields
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}[dtype.upper()] in kinds, kinds
    ref = full_precision_model(run / "model", Manifest.read(run / "model"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    _, _, ids = _chat_ids(run)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    for prompt, same_file, full in zip(ids, _logits(back, ids), _logits(ref, ids)):
        llm.reset()
        llm.eval(prompt)
        got = torch.tensor(llm.scores[len(prompt) - 1])
        assert (got - same_file[-1]).abs().max().item() < 5e-2
        assert (got - full[-1]).abs().max().item() < 0.5 * full[-1].abs().max().item()
    export_gguf(run, path, dtype)  # an export's own file is replaced


LLAMA_CPP_FALLBACK_LOG = """\
warning: blk.0.attn_k.weight                  - ncols    576 not divisible by    256 (required for type    q4_K) -> falling back to    q5_0
warning: blk.0.attn_v.weight                  - ncols    576 not divisible by    256 (required for type    q6_K) -> falling back to    q8_0
warning: blk.1.attn_k.weight                  - ncols    576 not divisible by    256 (required for type    q4_K) -> falling back to    q5_0
warning: blk.1.ffn_up.weight                  - ncols     24 not divisible by    256 (required for type    q4_K) (WARNING: must use F16 due to unusual shape) -> falling back to     f16
llama_model_quantize_impl: WARNING: 4 of 20 tensor(s) required fallback quantization
"""


def test_llama_cpps_fallback_warnings_become_one_line():
    """llama.cpp prints a line per tensor whose rows do not split into 256-value blocks (180 lines for SmolLM2's
    576-wide rows at q4_K_M): summed up as one line, counts and types kept."""
    from instructune.export.to_gguf import fallback_summary

    line = fallback_summary(LLAMA_CPP_FALLBACK_LOG)
    assert line.startswith("llama.cpp: 4 of 20 tensors") and "rows of 24/576 values" in line and "256-value" in line
    assert "q4_K -> q5_0 (2)" in line and "q6_K -> q8_0 (1)" in line and "q4_K -> f16 (1)" in line
    assert "\n" not in line
    assert fallback_summary("llama_model_quantize_impl: model size = 10 MB\n") is None


def test_a_k_quant_whose_rows_do_not_split_says_so_in_one_line(tmp_path, arch_run, capfd):
    """With llama-cpp-python, a model whose rows are not multiples of 256 (the tiny test Llama's): the file is
    written, and what fell back is one line on stdout, not llama.cpp's line per tensor."""
    pytest.importorskip("llama_cpp")
    path = export_gguf(arch_run("llama"), tmp_path / "k.gguf", "q4_K_M")
    out, err = capfd.readouterr()
    assert path.is_file() and "falling back" not in out + err, err[-2000:]
    assert sum(line.startswith("llama.cpp: ") and "tensors written in another type" in line
               for line in out.splitlines()) == 1, out[-2000:]


def test_llama3_rope_scaling_is_written_as_llama_cpps_rope_freqs(tmp_path):
    """Llama 3.1+'s RoPE scaling (one factor per frequency) as llama.cpp's converter stores it: `rope_freqs`, equal to
    transformers' own unscaled / scaled inverse frequencies; where llama.cpp is installed, it runs the file to the
    same logits."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base = build_tiny_model(tmp_path / "base", chat=True)
    tok = AutoTokenizer.from_pretrained(base)
    rope = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters=rope, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base, safe_serialization=True)
    run = _adapter_run(tmp_path, base, manifest_for(base))
    path = export_gguf(run, tmp_path / "m.gguf", "f32")
    factors = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight").data
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 1.0 / 10_000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    assert torch.allclose(torch.tensor(factors), plain / scaled, rtol=1e-5)
    assert len(set(factors.round(4).tolist())) == 3  # unscaled, smoothed and fully scaled frequencies: can fail
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = full_precision_model(run / "model", Manifest.read(run / "model"))
    _, texts, ids = _chat_ids(run)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    for prompt, logits in zip(ids, _logits(ref, ids)):
        llm.reset()
        llm.eval(prompt)
        assert (torch.tensor(llm.scores[len(prompt) - 1]) - logits[-1]).abs().max().item() < 2e-3
