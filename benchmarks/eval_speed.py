"""Evaluation speed on a real model (SmolLM2-135M by default), two comparisons on the same model object:

(a) classification by likelihood (`evaluate.likelihood.classify_by_likelihood`: score each choice, take the best)
    vs by generation (`evaluate.generate.generate` + parsing), 0-shot prompts of a classification task:
    wall time, accuracy, speed ratio;
(b) length-sorted batched generation (`generate`) vs one `model.generate` call per example (batch of 1, no
    padding), on a subset: wall time, share of identical outputs, metric of each; on the classification task
    and on a generation task with longer outputs: the demo's `incident_summaries` (`instructune demo-data`
    writes its data), or where that is missing the shared email-subject data (../shared/datasets/email-subjects,
    subject lines as short summaries), or neither.

Fair timing: each method is warmed up on one small batch first, then the methods take turns over the same chunks of
the examples (A B, then B A, ...), so a busy spell on a shared machine hits both rather than one.
`torch.set_num_threads` is left at its default. fp32 by default: bf16 rounding alone can flip greedy tokens.

    .venv/bin/python benchmarks/eval_speed.py --limit 200 --limit-per-example 48
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from instructune.config import ExperimentConfig, load_config  # noqa: E402
from instructune.evaluate.generate import generate  # noqa: E402
from instructune.evaluate.likelihood import classify_by_likelihood  # noqa: E402
from instructune.evaluate.metrics import PRIMARY_METRIC, compute_metrics  # noqa: E402
from instructune.models import load_for_inference  # noqa: E402
from instructune.prompts.shots import kshot_prompts  # noqa: E402
from instructune.runtime import autocast  # noqa: E402
from instructune.tasks import prepare  # noqa: E402


SHARED_EMAILS = ROOT.parent / "shared" / "datasets" / "email-subjects" / "emails.jsonl"


def email_subjects_config(model) -> ExperimentConfig:
    """Subject-line generation from the shared SpamAssassin emails: a summarization task with real, longer outputs."""
    return ExperimentConfig.model_validate({
        "name": "email-subjects", "model": model.model_dump(),
        "tasks": [{"name": "email_subjects", "type": "summarization", "data": {"path": str(SHARED_EMAILS)},
                   "template": "summarization/summarize", "fields": {"text": "body", "summary": "subject"}}]})


def say(*args) -> None:
    print(*args, flush=True)


def load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def chunks(n: int, rounds: int, batch_size: int) -> list[range]:
    """`rounds` contiguous chunks, each a whole number of batches where possible."""
    size = max(batch_size, math.ceil(n / max(rounds, 1) / batch_size) * batch_size)
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def race(methods: dict, prompts: list[str], rounds: int, batch_size: int) -> tuple[dict, dict]:
    """Run every method over the same prompts, taking turns chunk by chunk; (outputs, seconds) per method."""
    names = list(methods)
    for name in names:  # warm-up: one small batch each, untimed
        methods[name](prompts[:min(len(prompts), batch_size)])
    outputs = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    for r, part in enumerate(chunks(len(prompts), rounds, batch_size)):
        batch = [prompts[i] for i in part]
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            outputs[name] += methods[name](batch)
            seconds[name] += time.perf_counter() - t0
    return outputs, seconds


@torch.no_grad()
def generate_one_by_one(model, fmt, prompts: list[str], max_new_tokens: int, bf16: bool) -> list[str]:
    """The simple way: one `model.generate` call per example, no padding."""
    tok = fmt.tok
    device = next(model.parameters()).device
    end_ids = sorted(fmt.end_ids())
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([fmt.encode_prompt(prompt)], device=device)
        with autocast(bf16, device):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=end_ids, pad_token_id=tok.pad_token_id,
                                 temperature=None, top_p=None, top_k=None)
        outputs.append(fmt.clean_generation(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return outputs


def metric(task, preds: list[str], refs: list[str]) -> tuple[str, float]:
    name = PRIMARY_METRIC[task.template.type]
    metrics, _ = compute_metrics(task.template.type, preds, refs, task.template.choices)
    return name, metrics[name]


def compare_batching(model, task, prompts, refs, args, rows: list) -> None:
    """(b): batched vs per-example generation on the same prompts."""
    n_new = task.template.max_new_tokens
    outs, secs = race({
        "per-example": lambda ps: generate_one_by_one(model, task.fmt, ps, n_new, args.bf16),
        "batched": lambda ps: generate(model, task.fmt, ps, n_new, args.batch_size, desc="batched", bf16=args.bf16),
    }, prompts, args.rounds, args.batch_size)
    same = sum(a == b for a, b in zip(outs["batched"], outs["per-example"])) / len(prompts)
    name, m_one = metric(task, outs["per-example"], refs)
    _, m_bat = metric(task, outs["batched"], refs)
    ratio = secs["per-example"] / secs["batched"]
    say(f"{task.name}: batched vs per-example generation ({len(prompts)} examples, max_new_tokens {n_new}): "
        f"{secs['batched']:.1f} s vs {secs['per-example']:.1f} s ({ratio:.1f}x), identical outputs {100 * same:.1f} %, "
        f"{name} {m_bat:.4f} vs {m_one:.4f} ({100 * (m_bat - m_one):+.2f} points)")
    diffs = [(p, a, b) for p, a, b in zip(prompts, outs["batched"], outs["per-example"]) if a != b]
    for _, a, b in diffs[:3]:
        say(f"    differs: batched {a!r} | per-example {b!r}")
    rows.append((f"{task.name}: batched generation", len(prompts), secs["batched"], f"{name} {m_bat:.4f}",
                 f"{ratio:.1f}x faster; {100 * same:.1f} % identical"))
    rows.append((f"{task.name}: per-example generation", len(prompts), secs["per-example"], f"{name} {m_one:.4f}", ""))


def data_present(task_cfg) -> bool:
    d = task_cfg.data
    paths = [p for p in (d.path, d.train, d.validation, d.test) if p]
    return all(Path(p).exists() for p in paths)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/uci-sentiment.yaml", help="experiment config with a classification task")
    ap.add_argument("--task", default=None, help="classification task name (default: the config's first one)")
    ap.add_argument("--limit", type=int, default=None, help="test examples for (a) (default: the whole test split)")
    ap.add_argument("--limit-per-example", type=int, default=100, help="examples for (b), per-example vs batched")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bfloat16 autocast (default: fp32)")
    ap.add_argument("--rounds", type=int, default=4, help="chunks the methods take turns over")
    ap.add_argument("--gen-config", default="configs/demo.yaml", help="config holding the longer-output task for (b)")
    ap.add_argument("--gen-task", default="incident_summaries", help="that task's name ('' to skip)")
    args = ap.parse_args(argv)
    for key in ("config", "gen_config"):  # relative paths work from the repository root or from here
        if not Path(getattr(args, key)).exists() and (ROOT / getattr(args, key)).exists():
            setattr(args, key, str(ROOT / getattr(args, key)))

    started = time.perf_counter()
    say(f"eval_speed {datetime.date.today()} | {cpu_name()}, {os.cpu_count()} CPU(s), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
        f"{'bf16' if args.bf16 else 'fp32'}, batch size {args.batch_size}, load average {load_avg()}")

    cfg = load_config(args.config)
    prep = prepare(cfg)
    task = next(t for t in prep.tasks if (t.name == args.task if args.task else t.template.type == "classification"))
    choices = task.template.choices
    prompts = kshot_prompts(task.fmt, task.pairs["test"], task.pairs["train"], 0, cfg.seed, task.name, prep.context_length)
    refs = [p.completion for p in task.pairs["test"]]
    n = min(args.limit or len(prompts), len(prompts))
    prompts, refs = prompts[:n], refs[:n]
    model = load_for_inference(prep.model_source, cfg.model)
    say(f"model {cfg.model.name} ({prep.model_source}), task {task.name}: {n} test prompts (0-shot), "
        f"choices {choices}, generation max_new_tokens {task.template.max_new_tokens}")
    rows = []

    # (a) likelihood vs generation
    outs, secs = race({
        "likelihood": lambda ps: classify_by_likelihood(model, task.fmt, ps, choices, args.batch_size, args.bf16),
        "generation": lambda ps: generate(model, task.fmt, ps, task.template.max_new_tokens, args.batch_size,
                                          desc="generating", bf16=args.bf16),
    }, prompts, args.rounds, args.batch_size)
    acc_l = compute_metrics("classification", outs["likelihood"], refs, choices)[0]
    acc_g = compute_metrics("classification", outs["generation"], refs, choices)[0]
    ratio = secs["generation"] / secs["likelihood"]
    say(f"likelihood vs generation: {secs['likelihood']:.1f} s vs {secs['generation']:.1f} s ({ratio:.1f}x), "
        f"accuracy {acc_l['accuracy']:.3f} vs {acc_g['accuracy']:.3f} "
        f"(macro-F1 {acc_l['macro_f1']:.3f} vs {acc_g['macro_f1']:.3f}; unparseable generations "
        f"{100 * acc_g['invalid_rate']:.1f} %)")
    rows.append((f"{task.name}: likelihood", n, secs["likelihood"], f"accuracy {acc_l['accuracy']:.4f}",
                 f"{ratio:.1f}x faster than generation"))
    rows.append((f"{task.name}: generation", n, secs["generation"], f"accuracy {acc_g['accuracy']:.4f}",
                 f"invalid {100 * acc_g['invalid_rate']:.1f} %"))

    # (b) batched vs per-example generation: the classification task, then a task with longer outputs
    k = min(args.limit_per_example, n)
    compare_batching(model, task, prompts[:k], refs[:k], args, rows)
    if args.gen_task:
        gen_cfg = load_config(args.gen_config) if Path(args.gen_config).is_file() else None
        tc = next((t for t in gen_cfg.tasks if t.name == args.gen_task), None) if gen_cfg else None
        if tc is not None and data_present(tc):
            gen_cfg = gen_cfg.model_copy(update={"tasks": [tc]})
        else:
            why = f"no task {args.gen_task!r} in {args.gen_config}" if tc is None else \
                f"its data is missing ({tc.data.test or tc.data.path}; `instructune demo-data` writes the demo's)"
            gen_cfg = email_subjects_config(cfg.model) if SHARED_EMAILS.is_file() else None
            say(f"(b) {args.gen_task}: {why}; " + ("using the shared email-subject data instead" if gen_cfg else "skipped"))
        if gen_cfg is not None:
            gen_prep = prepare(gen_cfg)
            if gen_prep.model_source != prep.model_source:
                model = load_for_inference(gen_prep.model_source, gen_cfg.model)
            gtask = gen_prep.tasks[0]
            gprompts = kshot_prompts(gtask.fmt, gtask.pairs["test"], gtask.pairs["train"], 0, gen_cfg.seed, gtask.name,
                                      gen_prep.context_length)[:args.limit_per_example]
            grefs = [p.completion for p in gtask.pairs["test"]][:len(gprompts)]
            compare_batching(model, gtask, gprompts, grefs, args, rows)

    say("")
    say(f"{'method':<44} {'examples':>8} {'seconds':>8} {'s/example':>9}  {'metric':<18} note")
    for name, count, s, m, note in rows:
        say(f"{name:<44} {count:>8} {s:>8.1f} {s / count:>9.3f}  {m:<18} {note}")
    say(f"total {time.perf_counter() - started:.0f} s; load average {load_avg()}")


if __name__ == "__main__":
    main()
