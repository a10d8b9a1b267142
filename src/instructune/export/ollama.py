"""`export --format ollama`: a Modelfile beside the GGUF whose TEMPLATE renders exactly the prompt training used
(the chat template, or the plain format), with a stop for every end token and the task's system prompt."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import tasktypes
from ..data.load import Record
from ..errors import InstructuneError
from ..io import atomic_write, write_json
from ..manifest import Manifest
from ..prompts import TaskTemplate
from ..prompts.format import SHOT_DELIMITER
from .gotemplate import go_template
from .merged import end_token_ids
from .source import EXPORT_MARKER, check_output_folder, model_folder, tokenizer_and_format


@dataclass
class OllamaPrompt:
    template: str  # the TEMPLATE (Go template over .System and .Prompt)
    system: str | None  # the SYSTEM line, when training had a system prompt
    bos_added: str  # text training's prompt starts with that the GGUF tokenizer adds itself (Gemma's <bos>)
    stops: list[str]


def input_wrapper(template: TaskTemplate) -> tuple[str, str, str | None]:
    """(text before, text after) the user's input in the task's training prompt, and its system prompt; only for
    tasks with one input field, whose input can be the whole of what `ollama run` sends."""
    fields = tasktypes.get(template.type).inputs if template.template is not None else ("prompt",)
    if len(fields) != 1:
        raise InstructuneError(f"--task {template.task!r} is a {template.type} task with {len(fields)} input fields "
                               f"({', '.join(fields)}); a Modelfile can wrap one input field only (classification, "
                               "summarization, translation, NER or prompt/completion tasks); export without --task "
                               "and send the whole prompt instead", "--task")
    mark = f"\x00INPUT{os.getpid()}\x00"
    record = Record({template.fields.get(fields[0], fields[0]): mark}, "--task")
    try:
        messages = template.prompt_only(record)
    except InstructuneError as e:
        raise InstructuneError(f"the {template.task!r} template needs more than one input field ({e})", "--task") from None
    user = messages[-1]["content"]
    if user.count(mark) != 1:
        raise InstructuneError(f"the {template.task!r} template does not place its input once, verbatim, in the "
                               "prompt; it cannot be wrapped in a Modelfile", "--task")
    before, after = user.split(mark)
    return before, after, template.system_prompt


def _one(values: set, what: str):
    if len(values) > 1:
        raise InstructuneError(f"the model's tasks differ in {what}; choose the task the Modelfile serves with --task",
                               "--task")
    return next(iter(values), None)


def ollama_prompt(tokenizer, manifest: Manifest, task: str | None = None) -> OllamaPrompt:
    chat = manifest.chat_template
    templates = [manifest.task_template(task)] if task else list(manifest.templates().values())
    if task:
        before, after, system = input_wrapper(templates[0])
    else:
        before, after, system = "", "", _one({t.system_prompt for t in templates if t.system_prompt}, "system prompt")
    separator = _one({t.separator for t in templates}, "separator") if not chat else "\n"
    fmt = manifest.prompt_format(tokenizer, separator or "\n")

    def render(sys: str | None, user: str) -> str:
        return fmt.prompt_text(([{"role": "system", "content": sys}] if sys else []) + [{"role": "user", "content": user}])

    template = go_template(render, before, after)
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][0] == tokenizer.bos_token_id
    bos_added = ""
    if chat and adds_bos and template.startswith(bos):  # llama.cpp/Ollama add it; written twice it would be doubled
        template, bos_added = template[len(bos):], bos
    stops = [tokenizer.decode([i], skip_special_tokens=False) for i in end_token_ids(tokenizer, fmt)]
    if not chat:
        stops.append(SHOT_DELIMITER)  # evaluation cuts a plain model's answer there (PromptFormat.clean_generation)
    return OllamaPrompt(template, system, bos_added, stops)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise InstructuneError('the prompt format contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_from: str, prompt: OllamaPrompt) -> str:
    lines = [f"FROM {gguf_from}", f"TEMPLATE {_quoted(prompt.template)}"]
    if prompt.system:
        lines.append(f"SYSTEM {_quoted(prompt.system)}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in prompt.stops]
    lines.append("PARAMETER temperature 0")  # greedy, as instructune evaluated the model
    return "\n".join(lines) + "\n"


def write_modelfile(run_or_model_dir, gguf_path, out_dir, task: str | None = None) -> Path:
    """Write `out_dir/Modelfile` for the GGUF (FROM ./name when it lies in `out_dir`) and return its path."""
    model_dir = model_folder(run_or_model_dir)
    gguf_path = Path(gguf_path)
    if gguf_path.suffix != ".gguf" or not gguf_path.is_file():
        raise InstructuneError("no such GGUF file: export it first (`--format gguf`)", str(gguf_path))
    out_dir = check_output_folder(Path(out_dir), may_hold=(gguf_path.name, "Modelfile"))
    manifest = Manifest.read(model_dir)
    tokenizer, _ = tokenizer_and_format(model_dir, manifest)
    prompt = ollama_prompt(tokenizer, manifest, task)
    same = gguf_path.resolve().parent == out_dir.resolve()
    text = modelfile_text(f"./{gguf_path.name}" if same else str(gguf_path.resolve()), prompt)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "Modelfile", text)
    write_json(out_dir / EXPORT_MARKER, {"format": "ollama", "task": task, "gguf": gguf_path.name})
    return out_dir / "Modelfile"
