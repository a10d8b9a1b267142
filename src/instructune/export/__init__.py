"""Exporting a fine-tuned model: a merged transformers folder, a GGUF file, an Ollama Modelfile, and parity checks."""

from .gotemplate import render_go_template
from .merged import export_merged
from .ollama import ollama_prompt, write_modelfile
from .parity import gguf_outputs, llama_cpp_outputs, parity, parity_report, reference_outputs, test_prompts
from .to_gguf import export_gguf

__all__ = ["export_merged", "export_gguf", "write_modelfile", "ollama_prompt", "render_go_template", "parity",
           "parity_report", "reference_outputs", "gguf_outputs", "llama_cpp_outputs", "test_prompts"]


def export_run(run, format: str, dtype: str | None = None, out=None, task: str | None = None,
               check: bool | None = None, check_limit: int = 200):
    """One export of a run (see `instructune export --help`): the folder written and, with the check, the parity
    report per task (also written to `parity.json` in the folder)."""
    from pathlib import Path

    from ..errors import InstructuneError
    from ..io import write_json
    from ..rundir import MARKER, existing

    formats = {"merged": "float32", "gguf": "f16", "ollama": "f16"}
    if format not in formats:
        raise InstructuneError(f"unknown format {format!r}; choose one of {sorted(formats)}", "--format")
    dtype = dtype or formats[format]
    allowed = ("float32", "bfloat16", "float16") if format == "merged" else ("f16", "q8_0", "f32")
    if dtype not in allowed:
        raise InstructuneError(f"{format} exports take one of {list(allowed)}", f"--dtype {dtype}")
    if (Path(run) / MARKER).is_file():
        existing(Path(run), "RUN")  # one writer per run folder; retraining removes its exports (stale models)
    folder = Path(out) if out else Path(run) / "export" / (format if format == "merged" else f"{format}-{dtype}")
    if format == "merged":
        export_merged(run, folder, dtype)
        return folder, None
    gguf = export_gguf(run, folder / "model.gguf", dtype)
    if format == "ollama":
        write_modelfile(run, gguf, folder, task)
    prompts = test_prompts(run, check_limit)
    if check is False or (check is None and sum(len(t["prompts"]) for t in prompts.values()) > check_limit):
        return folder, None
    report = parity_report(run, gguf_outputs(run, gguf, check_limit), check_limit)
    write_json(folder / "parity.json", report)
    return folder, report
