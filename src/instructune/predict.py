"""Using a fine-tuned model on new data: a record from one input, batch predictions for a file of records (each
rendered with the template the model was trained with, from its manifest)."""

from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path

import torch

from . import tasktypes
from .data.load import Record, load_records
from .errors import InstructuneError
from .evaluate.generate import generate
from .evaluate.likelihood import choice_logprobs
from .io import atomic_write
from .models import load_finetuned
from .prompts import TaskTemplate
from .runtime import say


def record_from_text(text: str, template: TaskTemplate, where: str = "TEXT") -> Record:
    """A record from one input: a JSON object as it is, or plain text as the task's one input field."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise InstructuneError(f"looks like JSON but is not valid ({e.msg})", where) from None
        if not isinstance(data, dict):
            raise InstructuneError("expected a JSON object", where)
        return Record(data, where)
    if template.template is None:
        return Record({"prompt": text, "completion": ""}, where)
    needed = tasktypes.get(template.type).inputs
    if len(needed) > 1:
        raise InstructuneError(f"a {template.type} task needs a JSON record with {list(needed)}", where)
    return Record({template.fields.get(needed[0], needed[0]): text}, where)


def predict_file(model_dir: Path, input_path: Path, output: Path | None = None, task: str | None = None,
                 batch_size: int = 32, max_new_tokens: int | None = None, overwrite: bool = False) -> tuple[Path, int]:
    """One output record per input record, in input order: the input's fields plus `prediction` (and, for
    classification, the chosen `label` and its `probability` among the choices, by likelihood). Returns the
    output path and the number of records."""
    input_path = Path(input_path)
    output = Path(output) if output else input_path.with_name(input_path.stem + ".predictions.jsonl")
    if output.suffix.lower() not in (".jsonl", ".csv"):
        raise InstructuneError("the output must be a .jsonl or .csv file", f"--output {output}")
    if output.exists() and not overwrite:
        raise InstructuneError("exists; choose another --output or pass --overwrite", f"--output {output}")
    if output.resolve() == input_path.resolve():
        raise InstructuneError("would overwrite the input file", f"--output {output}")
    if batch_size < 1:
        raise InstructuneError(f"must be at least 1, not {batch_size}", "--batch-size")
    records = load_records(str(input_path))  # bad records fail here or in the template, with file:line
    model, tokenizer, manifest = load_finetuned(model_dir)
    template = manifest.task_template(task)
    fmt = manifest.prompt_format(tokenizer, template.separator)
    prompts = [fmt.pair_prompt(template.inference_pair(r)) for r in records]
    rows = [dict(r.data) for r in records]
    by_likelihood = tasktypes.get(template.type).choices and template.choices and not fmt.seq2seq
    name = output_names(records, ("prediction", "label", "probability") if by_likelihood else ("prediction",),
                        input_path)
    if by_likelihood:
        scores = choice_logprobs(model, fmt, prompts, template.choices, batch_size=batch_size, desc="predicting",
                                 answer_tokens=template.max_new_tokens)
        probs = torch.softmax(scores, dim=-1)
        for row, p in zip(rows, probs):
            best = int(p.argmax())
            row.update({name["prediction"]: template.choices[best], name["label"]: template.choices[best],
                        name["probability"]: round(float(p[best]), 6)})
    else:
        preds = generate(model, fmt, prompts, max_new_tokens or template.max_new_tokens, batch_size, desc="predicting")
        for row, pred in zip(rows, preds):
            row[name["prediction"]] = pred
    atomic_write(output, _csv(rows) if output.suffix.lower() == ".csv" else
                 "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
    return output, len(rows)


def output_names(records: list[Record], own: tuple[str, ...], where: Path) -> dict[str, str]:
    """The names of the fields predict adds: its own (`prediction`, ...), or all of them prefixed `instructune_` when
    an input record has one of them (its gold `label`, say), so no input field is ever overwritten."""
    fields = set().union(*(r.data for r in records)) if records else set()
    clash = sorted(fields & set(own))
    if not clash:
        return {k: k for k in own}
    names = {k: f"instructune_{k}" for k in own}
    if taken := sorted(fields & set(names.values())):
        raise InstructuneError(f"the input records have the fields {clash + taken}, every name predict could write "
                               "its answers under; rename one of them", str(where))
    say(f"the input records have the field(s) {', '.join(clash)}: the answers are written as "
        f"{', '.join(names.values())}, and the input's fields are kept as they are")
    return names


def _csv(rows: list[dict]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buf.getvalue()
