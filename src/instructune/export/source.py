"""What an export starts from: the run's model folder and manifest, the fine-tuned weights in full precision, and
output folders that are safe to write."""

from __future__ import annotations

from pathlib import Path

from ..errors import InstructuneError
from ..manifest import MANIFEST, Manifest
from ..models import check_model_folder, load_model, load_tokenizer, quiet_peft
from ..rundir import EXPORT_MARKER  # in every folder an export made, so a rerun may replace it



def model_folder(run_or_model_dir) -> Path:
    """The `model/` folder of a run (or the folder itself), refused when it holds no fine-tuned model."""
    path = Path(run_or_model_dir)
    if (path / "model").is_dir() and not (path / MANIFEST).is_file():
        path = path / "model"
    if not (path / MANIFEST).is_file():
        raise InstructuneError(f"no fine-tuned model here (no {MANIFEST}): run `instructune train` first, then export "
                               "the run folder or its model/ folder", str(run_or_model_dir))
    weights = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
    if not any((path / w).is_file() for w in weights):
        raise InstructuneError(f"the model folder has no weights (none of {list(weights)}): the training did not "
                               "finish; run `instructune train` again", str(path))
    return check_model_folder(path)  # safetensors only, readable headers, JSON configs


def is_adapter(model_dir: Path) -> bool:
    return (Path(model_dir) / "adapter_config.json").is_file()


def full_precision_model(model_dir: Path, manifest: Manifest):
    """The fine-tuned model in fp32, in eval mode: an adapter is merged into the fp32 base weights read from
    `manifest.base_model` (never into a quantized or bf16 copy, whose rounding the merge would bake in)."""
    import torch

    cfg = manifest.model_cfg()
    if not is_adapter(model_dir):
        return load_model(str(model_dir), cfg, torch.float32).eval()
    from peft import PeftModel

    base_dir = manifest.base_model
    if not base_dir or not Path(base_dir).is_dir():
        raise InstructuneError(f"the base model this adapter was trained on is not here any more ({base_dir!r}): "
                               "the merge needs its weights", str(Path(model_dir) / MANIFEST))
    base = load_model(str(base_dir), cfg, torch.float32)
    with quiet_peft():
        return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload().eval()


def tokenizer_and_format(model_dir: Path, manifest: Manifest):
    """The tokenizer saved with the model and the prompt format training used (its end tokens, its chat flag)."""
    tok = load_tokenizer(str(model_dir), manifest.model_cfg())
    return tok, manifest.prompt_format(tok)


def check_output_folder(out_dir: Path, may_hold: tuple[str, ...] = ()) -> Path:
    """Refuse to write into a folder that holds files an export did not make (an export replaces its folder whole)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InstructuneError("exists and is not a folder", str(out_dir))
    if out_dir.is_dir() and not (out_dir / EXPORT_MARKER).is_file():
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in may_hold)
        if other:
            raise InstructuneError(f"this folder holds other files ({', '.join(other[:5])}"
                                   f"{', ...' if len(other) > 5 else ''}) and was not made by `instructune export`; "
                                   "choose an empty or new folder", str(out_dir))
    return out_dir
