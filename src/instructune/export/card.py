"""The model card (README.md) of an export: base model, data fingerprint, results with intervals, prompt format."""

from __future__ import annotations

from pathlib import Path

from .. import tasktypes
from ..data.load import Record
from ..errors import InstructuneError
from ..io import read_json
from ..manifest import Manifest
from ..prompts import TaskTemplate

EXAMPLE_INPUT = "<your text here>"


def example_record(template: TaskTemplate) -> Record:
    """A record whose input fields hold a placeholder, to show a task's prompt as training rendered it."""
    if template.template is None:
        return Record({"prompt": EXAMPLE_INPUT}, "model card")
    names = tasktypes.get(template.type).inputs
    return Record({template.fields.get(n, n): EXAMPLE_INPUT for n in names}, "model card")


def results_table(results: dict) -> list[str]:
    """Per task: the primary metric of the best base variant and of the fine-tuned model, and the change in points
    with its paired-bootstrap interval."""
    rows = ["| task | metric | best base | fine-tuned | change (points) | interval (points) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, task in results.get("tasks", {}).items():
        metric, best = task["primary_metric"], task.get("best_base")
        tuned = task["results"]["finetuned"][metric]
        base = f"{task['results'][best][metric]:.4f} ({best})" if best else "-"
        ch = task.get("change_vs_best_base", {}).get(metric, {})
        points = f"{ch['points']:+.2f}" if "points" in ch else "-"
        ci = f"[{100 * ch['ci_low']:+.2f}, {100 * ch['ci_high']:+.2f}]" if "ci_low" in ch else "-"
        rows.append(f"| {name} | {metric} | {base} | {tuned:.4f} | {points} | {ci} |")
    return rows


def model_card(manifest: Manifest, tokenizer, run_dir: Path | None) -> str:
    chat = manifest.chat_template
    lines = ["# Fine-tuned with instructune", "",
             f"- base model: `{manifest.base_model_hub_id or manifest.base_model}`",
             f"- method: {manifest.method}",
             f"- data fingerprint: `{manifest.data_fingerprint}`",
             f"- prompt format: {'the chat template saved with the tokenizer' if chat else 'plain text (no chat template)'}",
             ""]
    results = read_json(run_dir / "results.json") if run_dir else {}
    if results.get("tasks"):
        stats = results.get("statistics", {})
        lines += ["## Results (test split)", "", *results_table(results), "",
                  f"Intervals: {stats.get('method', 'paired bootstrap')}, confidence {stats.get('confidence')}, "
                  f"{stats.get('resamples')} resamples.", ""]
    lines += ["## Prompt format", "",
              "Send exactly the prompt training used, or the answers will not match the evaluation. One rendered "
              f"example per task (`{EXAMPLE_INPUT}` stands for the input):", ""]
    for name, template in manifest.templates().items():
        fmt = manifest.prompt_format(tokenizer, template.separator)
        try:
            prompt = fmt.prompt_text(template.prompt_only(example_record(template)))
        except InstructuneError as e:  # a user template that reads fields beyond the task type's: say so, go on
            prompt = f"(not rendered: {e})"
        lines += [f"### {name} ({template.type})", "", "```text", prompt, "```", ""]
    return "\n".join(lines)
