"""Export parity: the exported artifact's greedy answers on the run's own test prompts against the evaluated
model's, as the share of identical outputs and each one's primary metric. The artifact runs through transformers
(`gguf_file=`) here; `llama_cpp_outputs` runs real llama.cpp when llama-cpp-python is installed."""

from __future__ import annotations

import time
from pathlib import Path

from .. import tasktypes
from ..errors import InstructuneError
from ..evaluate.generate import generate
from ..evaluate.metrics import compute_metrics
from ..io import read_json
from ..manifest import Manifest
from .source import full_precision_model, model_folder, tokenizer_and_format


def parity(reference: list[str], exported: list[str]) -> dict:
    """How many outputs are identical (after the evaluation's own cleaning) and their share."""
    if len(reference) != len(exported):
        raise ValueError(f"{len(reference)} reference outputs but {len(exported)} exported ones")
    same = sum(a == b for a, b in zip(reference, exported))
    return {"n": len(reference), "identical": same, "share_identical": same / len(reference) if reference else 1.0}


def test_prompts(run_dir, limit: int | None = None) -> dict[str, dict]:
    """Per trained task: the test prompts as evaluation rendered them, references, predictions and answer mode
    (read from finetuned.json), and the task's saved template."""
    model_dir = model_folder(run_dir)
    run_dir = model_dir.parent
    finetuned = read_json(run_dir / "finetuned.json")
    if not finetuned:
        raise InstructuneError("no finetuned.json: evaluate the run first (`instructune evaluate CONFIG`); parity "
                               "compares the export with the evaluated model", str(run_dir))
    out = {}
    for name, template in Manifest.read(model_dir).templates().items():
        result = finetuned.get(name, {}).get("finetuned")
        if not result:
            continue
        rows = result["predictions"][:limit]
        out[name] = {"template": template, "mode": result["mode"],
                     "prompts": [r["prompt"] for r in rows], "references": [r["reference"] for r in rows],
                     "predictions": [r["prediction"] for r in rows]}
    return out


def reference_outputs(run_dir, limit: int | None = None) -> dict[str, list[str]]:
    """The evaluated model's greedy answers: evaluation's own where it generated, else generated now (fp32)."""
    tasks = test_prompts(run_dir, limit)
    out = {n: t["predictions"] for n, t in tasks.items() if t["mode"] == "generation"}
    rest = [n for n in tasks if n not in out]
    if rest:  # likelihood-scored classification: its labels are not generations, so generate for a fair comparison
        model_dir = model_folder(run_dir)
        manifest = Manifest.read(model_dir)
        model = full_precision_model(model_dir, manifest)
        tokenizer, _ = tokenizer_and_format(model_dir, manifest)
        out.update(_generate_all(model, tokenizer, manifest, {n: tasks[n] for n in rest}))
    return out


def _generate_all(model, tokenizer, manifest: Manifest, tasks: dict) -> dict[str, list[str]]:
    out = {}
    for name, t in tasks.items():
        template = t["template"]
        fmt = manifest.prompt_format(tokenizer, template.separator)
        out[name] = generate(model, fmt, t["prompts"], template.max_new_tokens, desc=f"{name}: exported")
    return out


def gguf_outputs(run_dir, gguf_path, limit: int | None = None) -> dict[str, list[str]]:
    """Greedy answers of the GGUF file loaded back by transformers (weights and tokenizer from the file itself)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    model_dir = model_folder(run_dir)
    manifest = Manifest.read(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return _generate_all(model.eval(), tokenizer, manifest, test_prompts(run_dir, limit))


def llama_cpp_outputs(run_dir, gguf_path, limit: int | None = None, n_threads: int | None = None,
                      n_ctx: int = 4096, prompts: dict[str, list[str]] | None = None) -> tuple[dict[str, list[str]], float]:
    """Greedy answers of real llama.cpp (llama-cpp-python, imported only here) on the same prompt text, tokenized by
    the GGUF's own vocabulary, stopping at the GGUF's end-of-generation tokens; and llama.cpp's generated tokens/s."""
    try:
        import llama_cpp
    except ImportError:
        raise InstructuneError("llama.cpp parity needs llama-cpp-python (`pip install llama-cpp-python`; it builds "
                               "llama.cpp, several minutes)") from None
    model_dir = model_folder(run_dir)
    manifest = Manifest.read(model_dir)
    chat = manifest.chat_template
    _, train_fmt = tokenizer_and_format(model_dir, manifest)
    ends = train_fmt.end_ids()  # the GGUF keeps the tokenizer's ids, so training's end ids hold there too
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
    outputs, generated, seconds = {}, 0, 0.0
    for name, t in test_prompts(run_dir, limit).items():
        fmt = manifest.prompt_format(None, t["template"].separator)
        answers = []
        for prompt in (prompts or {}).get(name, t["prompts"]):  # e.g. rendered with the GGUF's own chat template
            # a chat prompt carries its own BOS as text; a plain prompt gets the tokenizer's, as in training
            ids = llm.tokenize(prompt.encode("utf-8"), add_bos=not chat, special=True)
            llm.reset()
            start, new = time.perf_counter(), []
            for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
                if token in ends or token == llm.token_eos() or len(new) >= t["template"].max_new_tokens:
                    break
                new.append(token)
            seconds += time.perf_counter() - start
            generated += len(new)
            answers.append(fmt.clean_generation(llm.detokenize(new).decode("utf-8", errors="replace")))
        outputs[name] = answers
    return outputs, generated / seconds if seconds else 0.0


def parity_report(run_dir, exported: dict[str, list[str]], limit: int | None = None) -> dict:
    """Per task: the share of identical greedy outputs and the primary metric of the evaluated model and the
    export, on the same test prompts."""
    tasks = test_prompts(run_dir, limit)
    reference = reference_outputs(run_dir, limit)
    report = {}
    for name, answers in exported.items():
        t = tasks[name]
        kind, choices = t["template"].type, t["template"].choices
        metric = tasktypes.get(kind).primary_metric
        ref_metrics, _ = compute_metrics(kind, reference[name], t["references"], choices)
        exp_metrics, _ = compute_metrics(kind, answers, t["references"], choices)
        report[name] = {**parity(reference[name], answers), "metric": metric, "reference": ref_metrics[metric],
                        "exported": exp_metrics[metric],
                        "difference_points": round(100 * (exp_metrics[metric] - ref_metrics[metric]), 4)}
    return report
