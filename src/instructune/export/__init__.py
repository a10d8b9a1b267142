"""Exporting a fine-tuned model: a merged transformers folder, a GGUF file, an Ollama Modelfile, and parity checks."""

from .gotemplate import render_go_template
from .merged import export_merged
from .ollama import ollama_prompt, write_modelfile
from .source import check_output_folder
from .parity import gguf_outputs, llama_cpp_outputs, parity, parity_report, reference_outputs, test_prompts
from .to_gguf import GGUF_TYPES, KQUANTS, export_gguf, llama_cpp_quantizer

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
    dtype = formats[format] if dtype is None else dtype  # an empty --dtype is refused, not the default
    allowed = ("float32", "bfloat16", "float16") if format == "merged" else GGUF_TYPES
    if dtype not in allowed:
        raise InstructuneError(f"{format} exports take one of {list(allowed)}", f"--dtype {dtype}")
    if dtype in KQUANTS:
        llama_cpp_quantizer(dtype)  # refused before anything is written where llama-cpp-python is missing
    if (Path(run) / MARKER).is_file():
        existing(Path(run), "RUN")  # one writer per run folder; retraining removes its exports (stale models)
    folder = Path(out) if out else Path(run) / "export" / (format if format == "merged" else f"{format}-{dtype}")
    new = not check_output_folder(folder).exists()  # a folder no export made is refused before the first byte
    try:
        if format == "merged":
            export_merged(run, folder, dtype)
            claim(folder, format, dtype, [p.name for p in folder.iterdir()])  # replaced whole: all of it is ours
            return folder, None
        gguf = export_gguf(run, folder / "model.gguf", dtype)
        claim(folder, format, dtype, [gguf.name])
        if format == "ollama":
            write_modelfile(run, gguf, folder, task)
            claim(folder, format, dtype, ["Modelfile"])
    except BaseException:
        if new and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a failed first export leaves no empty folder behind
        raise
    if check is False:  # (the check needs the evaluated run; an export without it does not)
        return folder, None
    prompts = test_prompts(run, check_limit)
    if check is None and sum(len(t["prompts"]) for t in prompts.values()) > check_limit:
        return folder, None
    report = parity_report(run, gguf_outputs(run, gguf, check_limit), check_limit)
    write_json(folder / "parity.json", report)
    claim(folder, format, dtype, ["parity.json"])
    return folder, report


def claim(folder, format: str, dtype: str, written: list[str]) -> None:
    """The export folder's marker, listing every file an export wrote there: a later export may replace the folder,
    and retraining removes those files, and only those (`rundir.remove_exports`)."""
    from ..io import read_json, write_json
    from ..rundir import EXPORT_MARKER

    marker = folder / EXPORT_MARKER
    old = read_json(marker, "export marker") if marker.is_file() else {}
    old = old if isinstance(old, dict) else {}
    files = sorted(set(old.get("files") or []) | set(written) | {EXPORT_MARKER})
    write_json(marker, {**old, "format": format, "dtype": dtype, "files": files})
