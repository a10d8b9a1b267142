"""`export --format gguf`: one .gguf file llama.cpp runs as it is (Llama and Gemma 3), written with the `gguf`
package's writer, tensor-name maps and quantizer; the model-specific steps follow llama.cpp's convert_hf_to_gguf.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np

from ..errors import InstructuneError
from .merged import end_token_ids
from ..manifest import Manifest
from .source import full_precision_model, model_folder, tokenizer_and_format
from .vocab import build_vocab

ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA, "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3}
OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
GEMMA3_SWA_PERIOD = 6  # llama.cpp's Gemma 3: five sliding-window layers, then one global, from the first layer
GEMMA3_SWA_ROPE_BASE = 10_000.0  # llama.cpp's Gemma 3 uses this RoPE base on its sliding-window layers


def architecture(model_dir: Path, manifest: Manifest) -> str:
    """The model's architecture name, read from its config before any weight is loaded; refused if unsupported."""
    source = Path(manifest.base_model or model_dir) if (model_dir / "adapter_config.json").is_file() else model_dir
    config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    arch = (config.get("architectures") or ["unknown"])[0]
    if arch not in ARCHITECTURES:
        raise InstructuneError(f"GGUF export does not support the architecture {arch!r}; supported: "
                               f"{sorted(ARCHITECTURES)} (export --format merged works for any model)", str(source))
    return arch


def _rope(config) -> tuple[float, dict]:
    """The (global) RoPE base and scaling; only unscaled and linear RoPE are exported."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = params.get("full_attention", params)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10_000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear"):
        raise InstructuneError(f"GGUF export does not support RoPE scaling {kind!r} (only none and linear)")
    return float(theta), ({"factor": params["factor"]} if kind == "linear" else {})


def _check_gemma3(config) -> None:
    """Refuse a Gemma 3 whose attention layout llama.cpp would not reproduce (it hard-codes these)."""
    layers = getattr(config, "layer_types", None) or []
    expected = ["full_attention" if (i + 1) % GEMMA3_SWA_PERIOD == 0 else "sliding_attention" for i in range(len(layers))]
    if layers != expected:
        raise InstructuneError("llama.cpp runs Gemma 3 with five sliding-window layers then one global layer; this "
                               f"model's layer_types {layers} differ, so its GGUF would compute something else")
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta",
                                                                                              GEMMA3_SWA_ROPE_BASE)
    if float(local) != GEMMA3_SWA_ROPE_BASE or config.query_pre_attn_scalar != config.head_dim:
        raise InstructuneError("llama.cpp's Gemma 3 assumes a sliding-window RoPE base of 10000 and a query scale of "
                               "1/sqrt(head_dim); this model differs")
    if getattr(config, "attn_logit_softcapping", None):
        raise InstructuneError("Gemma 3 with attention logit soft-capping is not supported by llama.cpp")


def write_hparams(writer: "gguf.GGUFWriter", arch: str, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if arch == "LlamaForCausalLM":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    else:
        _check_gemma3(config)
        writer.add_sliding_window(config.sliding_window)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)


def permute(weight, n_head: int, n_head_kv: int):
    """Llama's q/k rows from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model, arch: str):
    """(GGUF name, fp32 array) for every weight, transformed as llama.cpp's converter does for the architecture."""
    config = model.config
    names = gguf.get_tensor_name_map(ARCHITECTURES[arch], config.num_hidden_layers)
    state = model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd when there is no output tensor
        data = tensor.detach().float()
        if arch == "LlamaForCausalLM" and name.endswith("q_proj.weight"):
            data = permute(data, config.num_attention_heads, config.num_attention_heads)
        elif arch == "LlamaForCausalLM" and name.endswith("k_proj.weight"):
            data = permute(data, config.num_attention_heads, config.num_key_value_heads)
        elif arch == "Gemma3ForCausalLM" and name.endswith("norm.weight"):
            data = data + 1.0  # Gemma3RMSNorm scales by (1 + weight); llama.cpp's norm by the weight itself
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InstructuneError(f"no GGUF tensor name for {name!r} in {arch}")
        yield new, data.numpy()


def encode_tensor(data: np.ndarray, outtype: str) -> tuple[np.ndarray, "gguf.GGMLQuantizationType | None"]:
    """llama.cpp's rule: 1-D tensors (norms) stay f32; matrices become f16 or q8_0 (f16 when rows do not split
    into 32-value blocks)."""
    if outtype == "f32" or data.ndim == 1:
        return data.astype(np.float32), None
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def check_gguf_target(out_path: Path) -> Path:
    out_path = Path(out_path)
    if out_path.suffix != ".gguf":
        raise InstructuneError("the GGUF output must be a .gguf file", str(out_path))
    if out_path.exists():
        ours = False
        if out_path.is_file():
            try:
                ours = "instructune.tasks" in gguf.GGUFReader(out_path).fields
            except (ValueError, OSError):
                ours = False
        if not ours:
            raise InstructuneError("exists and was not written by `instructune export`; choose another path", str(out_path))
    return out_path


def export_gguf(run_or_model_dir, out_path, outtype: str = "f16") -> Path:
    """Write the fine-tuned model (adapter merged in fp32) as one GGUF file at `out_path` and return it."""
    if outtype not in OUTTYPES:
        raise InstructuneError(f"unknown GGUF type {outtype!r}; choose one of {list(OUTTYPES)}", "--dtype")
    model_dir = model_folder(run_or_model_dir)
    out_path = check_gguf_target(out_path)
    manifest = Manifest.read(model_dir)
    arch = architecture(model_dir, manifest)
    model = full_precision_model(model_dir, manifest)
    tokenizer, fmt = tokenizer_and_format(model_dir, manifest)
    ends = end_token_ids(tokenizer, fmt)
    n_rows = model.get_input_embeddings().weight.shape[0]
    vocab = build_vocab(tokenizer, n_rows, next((i for i in ends if i != tokenizer.eos_token_id), None))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[arch]])
        writer.add_name(model_dir.resolve().parent.name if model_dir.name == "model" else model_dir.name)
        writer.add_file_type(OUTTYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, arch, model.config)
        vocab.add_to(writer)
        if manifest.chat_template and tokenizer.chat_template:  # only a template the model was trained with
            writer.add_chat_template(tokenizer.chat_template)
        write_instructune_metadata(writer, manifest, ends)
        for name, data in gguf_tensors(model, arch):
            encoded, raw = encode_tensor(data, outtype)
            writer.add_tensor(name, encoded, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def write_instructune_metadata(writer: "gguf.GGUFWriter", manifest: Manifest, ends: list[int]) -> None:
    """What instructune knows and llama.cpp does not: the task templates, whether prompts went through the chat
    template, the end tokens training taught, the base model and the data."""
    writer.add_string("instructune.tasks", json.dumps(manifest.tasks, ensure_ascii=False))
    writer.add_bool("instructune.chat_template_used", manifest.chat_template)
    writer.add_array("instructune.end_token_ids", [int(i) for i in ends])
    writer.add_string("instructune.base_model", str(manifest.base_model_hub_id or manifest.base_model))
    writer.add_string("instructune.method", str(manifest.method))
    writer.add_string("instructune.data_fingerprint", str(manifest.data_fingerprint))
