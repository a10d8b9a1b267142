"""`export --format merged`: a standalone transformers folder (adapter merged into the fp32 base), tokenizer, end
tokens, manifest and model card."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InstructuneError
from ..io import atomic_write, replaced_folder, write_json
from ..manifest import MANIFEST, Manifest
from .card import model_card
from .source import (EXPORT_MARKER, check_output_folder, full_precision_model, model_folder,
                     tokenizer_and_format)

DTYPES = ("float32", "bfloat16", "float16")


def end_token_ids(tokenizer, fmt) -> list[int]:
    """EOS first, then the end-of-turn token(s) the model was trained to emit (generation stops at any of them)."""
    ids = sorted(fmt.end_ids())
    return sorted(ids, key=lambda i: i != tokenizer.eos_token_id)


def export_merged(run_or_model_dir, out_dir, dtype: str = "float32") -> Path:
    """Write the merged model into `out_dir` (replaced whole, atomically) and return it."""
    import torch

    if dtype not in DTYPES:
        raise InstructuneError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}", "--dtype")
    model_dir = model_folder(run_or_model_dir)
    out_dir = check_output_folder(Path(out_dir))
    manifest = Manifest.read(model_dir)
    model = full_precision_model(model_dir, manifest).to(getattr(torch, dtype))  # cast after the fp32 merge
    tokenizer, fmt = tokenizer_and_format(model_dir, manifest)
    ends = end_token_ids(tokenizer, fmt)
    gen = model.generation_config
    gen.eos_token_id = ends if len(ends) > 1 else ends[0]
    gen.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = gen.eos_token_id
    run_dir = model_dir.parent if (model_dir.parent / "results.json").is_file() else None
    with replaced_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(model_dir / MANIFEST, tmp / MANIFEST)
        atomic_write(tmp / "README.md", model_card(manifest, tokenizer, run_dir))
        write_json(tmp / EXPORT_MARKER, {"format": "merged", "dtype": dtype, "source": str(model_dir.resolve())})
    return out_dir
