"""The architectures GGUF export supports and what differs between them, each as llama.cpp's own converter writes it
(convert_hf_to_gguf.py; conversion/llama.py, qwen.py, phi.py, gemma.py): the GGUF architecture, the q/k row
permutation (llama.cpp's LLAMA rotates interleaved pairs; Qwen, Phi-3 and Gemma use Hugging Face's halves as they
are), the metadata keys, and the layouts llama.cpp would compute differently (refused, or said, before any weight
is read)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np

from ..errors import InstructuneError
from ..runtime import warn

GEMMA3_SWA_PERIOD = 6  # llama.cpp's Gemma 3: five sliding-window layers, then one global, from the first layer
GEMMA3_SWA_ROPE_BASE = 10_000.0  # llama.cpp's Gemma 3 uses this RoPE base on its sliding-window layers


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("full_attention", params)


def rope(config, arch: "gguf.MODEL_ARCH") -> tuple[float, dict]:
    """The (global) RoPE base and scaling: none, linear, or Llama 3's (a factor per frequency: `rope_factors`)."""
    params = _rope_parameters(config)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10_000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear") and not (kind == "llama3" and arch == gguf.MODEL_ARCH.LLAMA):
        raise InstructuneError(f"GGUF export does not support RoPE scaling {kind!r} (only none, linear, and llama3 "
                               "on Llama)")
    return float(theta), ({"factor": params["factor"]} if kind == "linear" else {})


def rope_factors(config):
    """Llama 3.1+'s RoPE scaling as llama.cpp stores it (conversion/llama.py): one divisor per rotary frequency,
    the `rope_freqs` tensor; None for any other RoPE."""
    params = _rope_parameters(config)
    if (params.get("rope_type") or "").lower() != "llama3":
        return None
    dim = head_dim(config)
    freqs = 1.0 / (params.get("rope_theta", 10_000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, old_context = params.get("factor", 8.0), params.get("original_max_position_embeddings", 8192)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _llama(writer: "gguf.GGUFWriter", config) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))


def _mistral(writer: "gguf.GGUFWriter", config) -> None:
    """Mistral is llama.cpp's LLAMA; its sliding window (none from v0.2 on) is kept as metadata."""
    _llama(writer, config)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)


def _phi3(writer: "gguf.GGUFWriter", config) -> None:
    """Phi-3 as conversion/phi.py writes it: the original context length, the rotary dimensions (a share of the
    head) and the sliding window (0 when none)."""
    params = getattr(config, "rope_parameters", None) or {}
    n_rot = int(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
                * config.hidden_size) // config.num_attention_heads
    writer.add_rope_scaling_orig_ctx_len(getattr(config, "original_max_position_embeddings", None)
                                         or config.max_position_embeddings)
    writer.add_rope_dimension_count(n_rot)
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


def _gemma3(writer: "gguf.GGUFWriter", config) -> None:
    writer.add_sliding_window(config.sliding_window)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _window_said(config) -> None:
    """Mistral v0.1 and Phi-3 have a sliding window that llama.cpp does not apply (its LLAMA has none; its Phi-3
    window is disabled): equal to transformers only while a prompt fits the window."""
    window = getattr(config, "sliding_window", None) or 0
    if 0 < window < config.max_position_embeddings:
        warn(f"this {config.model_type} model attends to a sliding window of {window} tokens; llama.cpp attends to "
             f"the whole context, so prompts longer than {window} tokens will be answered differently")


def _full_attention_only(config) -> None:
    """Qwen 2/2.5/3 in llama.cpp attend to the whole context on every layer (`use_sliding_window` is not read)."""
    sliding = [i for i, t in enumerate(getattr(config, "layer_types", None) or []) if t != "full_attention"]
    if sliding:
        raise InstructuneError(f"layers {sliding} of this model use sliding-window attention, which llama.cpp's "
                               f"{config.model_type} does not implement; its GGUF would compute something else")


def _gemma3_layout(config) -> None:
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


@dataclass(frozen=True)
class Arch:
    gguf: "gguf.MODEL_ARCH"
    hparams: Callable  # (writer, config): the architecture's own keys
    check: Callable = lambda config: None  # (config): refuse (or say) what llama.cpp would compute differently
    permute_qk: bool = False  # q/k rows (and biases) to llama.cpp's interleaved rotary layout
    norm_offset: float = 0.0  # added to every norm weight (Gemma's RMSNorm scales by 1 + weight)


ARCHITECTURES = {
    "LlamaForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, _llama, permute_qk=True),
    "MistralForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, _mistral, _window_said, permute_qk=True),
    # Qwen 2: q/k/v biases mapped as they are; Qwen 3: q/k norms (attn_q_norm, attn_k_norm) and its own head size
    "Qwen2ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN2, lambda writer, config: None, _full_attention_only),
    "Qwen3ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN3, lambda writer, config: None, _full_attention_only),
    "Phi3ForCausalLM": Arch(gguf.MODEL_ARCH.PHI3, _phi3, _window_said),  # fused qkv_proj and gate_up_proj stay fused
    "Gemma3ForCausalLM": Arch(gguf.MODEL_ARCH.GEMMA3, _gemma3, _gemma3_layout, norm_offset=1.0),
}


def check_layout(arch: str, config) -> None:
    """Before any weight is read: the RoPE and the attention layout llama.cpp would run as transformers does."""
    rope(config, ARCHITECTURES[arch].gguf)
    ARCHITECTURES[arch].check(config)


def check_supported(arch: str, where: str) -> Arch:
    if arch not in ARCHITECTURES:
        raise InstructuneError(f"GGUF export does not support the architecture {arch!r}; supported: "
                               f"{sorted(ARCHITECTURES)} (export --format merged works for any model)", where)
    return ARCHITECTURES[arch]


def write_hparams(writer: "gguf.GGUFWriter", arch: str, config) -> None:
    """The keys every supported architecture shares (TextModel.set_gguf_parameters), then the architecture's own."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    theta, scaling = rope(config, ARCHITECTURES[arch].gguf)
    writer.add_rope_freq_base(theta)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    ARCHITECTURES[arch].hparams(writer, config)


def permute(weight, n_head: int, n_head_kv: int):
    """Llama's q/k rows from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model, arch: str):
    """(GGUF name, fp32 array) for every weight, transformed as llama.cpp's converter does for the architecture."""
    config, spec = model.config, ARCHITECTURES[arch]
    names = gguf.get_tensor_name_map(spec.gguf, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd when there is no output tensor
        data = tensor.detach().float()
        if spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, config.num_attention_heads, config.num_attention_heads)
        elif spec.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, config.num_attention_heads, config.num_key_value_heads)
        elif spec.norm_offset and name.endswith("norm.weight"):
            data = data + spec.norm_offset
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InstructuneError(f"no GGUF tensor name for {name!r} in {arch}")
        yield new, data.numpy()
    factors = rope_factors(config)
    if factors is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors
