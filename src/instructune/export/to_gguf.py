"""`export --format gguf`: one .gguf file llama.cpp runs as it is (Llama, Mistral, Qwen 2/2.5/3, Phi-3, Gemma 3),
written with the `gguf` package's writer, tensor-name maps and quantizer; the model-specific steps (archs.py) follow
llama.cpp's convert_hf_to_gguf.py. K-quants are made from that file by llama.cpp's own quantizer."""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from ..errors import InstructuneError
from ..manifest import Manifest
from ..runtime import say
from .archs import ARCHITECTURES, check_layout, check_supported, gguf_tensors, write_hparams
from .merged import end_token_ids
from .source import full_precision_model, model_folder, tokenizer_and_format
from .vocab import build_vocab

OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# K-quants: the `gguf` package cannot make them; llama.cpp's llama_model_quantize does (llama-cpp-python)
KQUANTS = {"q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}
GGUF_TYPES = (*OUTTYPES, *KQUANTS)


def architecture(model_dir: Path, manifest: Manifest) -> str:
    """The model's architecture name, read from its config before any weight is loaded; refused if unsupported or
    laid out in a way llama.cpp would compute differently."""
    source = Path(manifest.base_model or model_dir) if (model_dir / "adapter_config.json").is_file() else model_dir
    config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    arch = (config.get("architectures") or ["unknown"])[0]
    check_supported(arch, str(source))
    from transformers import AutoConfig

    check_layout(arch, AutoConfig.from_pretrained(source))
    return arch


def llama_cpp_quantizer(outtype: str):
    """llama-cpp-python, whose llama_model_quantize makes K-quants; refused (exit 2) with the install command."""
    try:
        import llama_cpp
    except ImportError:
        raise InstructuneError(f"{outtype} is made by llama.cpp's own quantizer, which needs llama-cpp-python: "
                               f"`{Path(sys.executable).name} -m pip install llama-cpp-python` (it builds llama.cpp "
                               "from source, 15-30 minutes); f16, q8_0 and f32 need nothing more", "--dtype") from None
    return llama_cpp


def quantize(llama_cpp, src: Path, dst: Path, outtype: str) -> None:
    """llama.cpp's quantizer, as `llama-quantize SRC DST Q4_K_M` runs it: its per-tensor type mix (for _M, the output
    and part of attn_v and ffn_down at Q6_K), its fallback for rows that do not split into 256-value blocks, and every
    metadata key copied (the chat template, end ids and task templates). Its messages are held back: a line per
    tensor that falls back becomes one summary (`fallback_summary`); everything, when it fails."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANTS[outtype])
    params.nthread = os.cpu_count() or 1
    say(f"quantizing to {outtype} with llama.cpp")
    said: list[tuple[int, str]] = []

    @llama_cpp.llama_log_callback
    def hold(level, text, user_data):
        said.append((level, text.decode("utf-8", "replace")))

    llama_cpp.llama_backend_init()  # as llama-quantize does first (f16 tables, CPU backend); repeated calls are harmless
    llama_cpp.llama_log_set(hold, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:  # llama-cpp-python's own logger again (None: llama.cpp's default, stderr)
        llama_cpp.llama_log_set(getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None),
                                ctypes.c_void_p(0))
    if status != 0:
        print("".join(text for _, text in said), file=sys.stderr, flush=True)
        raise InstructuneError(f"llama.cpp's quantizer failed to write {outtype} (see its messages above)", "--dtype")
    # ggml.h: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (the previous message goes on; llama-cpp-python's own logger
    # has the older numbering): errors and warnings pass through, but the fallbacks' lines become one
    kept, level = [], 0
    for lvl, text in said:
        level = level if lvl == 5 else lvl
        kept += [text] if level >= 3 else []
    shown = [line for line in "".join(kept).splitlines(keepends=True)
             if line.strip() and "falling back to" not in line and "required fallback quantization" not in line]
    if shown:
        print("".join(shown), end="", file=sys.stderr, flush=True)
    if summary := fallback_summary("".join(text for _, text in said)):
        say(summary)


FALLBACK = re.compile(r"ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\w+)\)\s*(?:\([^)]*\)\s*)?"
                      r"-> falling back to\s+(\w+)")


def fallback_summary(log: str) -> str | None:
    """One line for llama.cpp's per-tensor "falling back" warnings (a model whose rows do not split into K-quants'
    256-value blocks, as SmolLM2's 576), or None when no tensor fell back."""
    found = FALLBACK.findall(log)
    if not found:
        return None
    total = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log)
    counted = f"{total[1]} of {total[2]}" if total else str(len(found))
    cols = sorted({int(c) for c, *_ in found})
    swaps = ", ".join(f"{want} -> {got} ({n})" for (want, got), n in Counter((w, g) for _, _, w, g in found).items())
    return (f"llama.cpp: {counted} tensors written in another type, as llama-quantize does: rows of "
            f"{'/'.join(map(str, cols))} values do not split into {found[0][1]}-value blocks ({swaps})")


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
    """Write the fine-tuned model (adapter merged in fp32) as one GGUF file at `out_path` and return it. A K-quant is
    written as f16 first, then quantized by llama.cpp; nothing is left at `out_path` unless all of it succeeded."""
    if outtype not in GGUF_TYPES:
        raise InstructuneError(f"unknown GGUF type {outtype!r}; choose one of {list(GGUF_TYPES)}", "--dtype")
    llama_cpp = llama_cpp_quantizer(outtype) if outtype in KQUANTS else None
    model_dir = model_folder(run_or_model_dir)
    out_path = check_gguf_target(out_path)
    manifest = Manifest.read(model_dir)
    arch = architecture(model_dir, manifest)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    f16 = out_path.with_name(f".{out_path.name}.{os.getpid()}.f16.tmp")
    try:
        if llama_cpp is None:
            write_gguf(model_dir, manifest, arch, tmp, outtype)
        else:
            write_gguf(model_dir, manifest, arch, f16, "f16")
            quantize(llama_cpp, f16, tmp, outtype)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)
    return out_path


def write_gguf(model_dir: Path, manifest: Manifest, arch: str, path: Path, outtype: str) -> None:
    model = full_precision_model(model_dir, manifest)
    tokenizer, fmt = tokenizer_and_format(model_dir, manifest)
    ends = end_token_ids(tokenizer, fmt)
    n_rows = model.get_input_embeddings().weight.shape[0]
    vocab = build_vocab(tokenizer, n_rows, next((i for i in ends if i != tokenizer.eos_token_id), None))
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[arch].gguf])
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


def write_instructune_metadata(writer: "gguf.GGUFWriter", manifest: Manifest, ends: list[int]) -> None:
    """What instructune knows and llama.cpp does not: the task templates, whether prompts went through the chat
    template, the end tokens training taught, the base model and the data."""
    writer.add_string("instructune.tasks", json.dumps(manifest.tasks, ensure_ascii=False))
    writer.add_bool("instructune.chat_template_used", manifest.chat_template)
    writer.add_array("instructune.end_token_ids", [int(i) for i in ends])
    writer.add_string("instructune.base_model", str(manifest.base_model_hub_id or manifest.base_model))
    writer.add_string("instructune.method", str(manifest.method))
    writer.add_string("instructune.data_fingerprint", str(manifest.data_fingerprint))
