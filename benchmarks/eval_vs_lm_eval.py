"""Evaluation speed against the peer: instructune's evaluation and EleutherAI's lm-evaluation-harness (HF backend) on
the same model, the same prompts and the same test split, generation and log-likelihood; then the e-mail subject
2-shot baseline (long prompts) timed on its own.

Not a test: run it by hand, with nothing else busy. lm-eval is a benchmark-only dependency:

    .venv/bin/pip install lm-eval
    .venv/bin/python benchmarks/eval_vs_lm_eval.py                     # UCI test split (400), both modes, e-mails
    .venv/bin/python benchmarks/eval_vs_lm_eval.py --limit 100 --no-emails

What each tool is given:
- The model: the preset's base model (`smollm2-135m`), loaded once in fp32 by instructune and handed to lm-eval's
  `HFLM(pretrained=<the model object>)`, so both run the very same weights on the same threads.
- The prompts: instructune renders each test example through the task's template and the model's chat template
  (0-shot); lm-eval reads those strings from a JSONL file through a task YAML (`doc_to_text: "{{prompt}}"`), with
  no chat template or few-shot of its own and an empty target delimiter, so both see the same tokens.
- Generation: greedy, at most the task's `max_new_tokens`, stopping at the end-of-turn token (lm-eval: `until`);
  the answers of both are scored by instructune's parser and metric, and the share of answers that name the same
  choice is printed. instructune's evaluation also stops an answer once the choice it names is settled
  (`metrics.choice_settled`: "Positive:" cannot become another label), as `instructune run` does; the row
  "generation, to the end" times it without that (every answer to the end-of-turn or `max_new_tokens`), and its
  texts are compared with lm-eval's character for character.
- Log-likelihood: instructune's `classify_by_likelihood` against lm-eval's `multiple_choice` output type, with the
  choices as instructune scores them (the label and the end-of-turn token, `completion_ids`); accuracy of each.
- Batch size: the same for both (`--batch-size`, default 16); lm-eval sorts by length like instructune.
Times are wall times of the evaluation calls alone (model loading excluded for both; lm-eval's task building is
included, it is part of what a user waits for, and is printed separately).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from instructune.config import load_config  # noqa: E402
from instructune.evaluate.generate import generate  # noqa: E402
from instructune.evaluate.likelihood import classify_by_likelihood, completion_ids  # noqa: E402
from instructune.evaluate.metrics import PRIMARY_METRIC, compute_metrics, parse_choice  # noqa: E402
from instructune.evaluate.score import settled  # noqa: E402
from instructune.models import load_for_inference  # noqa: E402
from instructune.prompts.shots import kshot_prompts  # noqa: E402
from instructune.tasks import prepare  # noqa: E402


def task_yamls(folder: Path, data: Path, end: str, max_new: int, choices: list[str]) -> None:
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"{{prompt}}\"\ntarget_delimiter: \"\"\nnum_fewshot: 0\n")
    (folder / "gen.yaml").write_text(
        "task: instructune_uci_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{target}}\"\n"
        f"generation_kwargs:\n  until: {json.dumps([end])}\n  do_sample: false\n  max_gen_toks: {max_new}\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "mc.yaml").write_text(
        "task: instructune_uci_mc\n" + common + "output_type: multiple_choice\ndoc_to_target: \"{{label}}\"\n"
        f"doc_to_choice: {json.dumps(choices)}\nmetric_list:\n  - metric: acc\n")


def lm_eval_run(model, tok, task: str, folder: Path, batch_size: int) -> tuple[list, float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=2048)
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(folder)),
                          log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return samples, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="test examples (default: the whole UCI test split, 400)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--emails", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    torch.manual_seed(0)

    cfg = load_config(ROOT / "configs/uci-sentiment.yaml", [])
    prep = prepare(cfg)
    task = prep.tasks[0]
    fmt, template = task.fmt, task.template
    test = task.pairs["test"][: args.limit]
    prompts = [fmt.prompt_text(p.messages) for p in test]
    refs = [p.completion for p in test]
    model = load_for_inference(prep.model_source, cfg.model)
    tok = fmt.tok
    end = tok.decode([min(fmt.end_ids() - {tok.eos_token_id} or fmt.end_ids())])
    choice_texts = [tok.decode(completion_ids(fmt, c)) for c in template.choices]
    metric = PRIMARY_METRIC[template.type]
    rows = []
    with tempfile.TemporaryDirectory(prefix="instructune-lmeval-") as tmp:
        folder = Path(tmp)
        data = folder / "test.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "target": r, "label": template.choices.index(r)}) + "\n"
                                for p, r in zip(prompts, refs)))
        task_yamls(folder, data, end, template.max_new_tokens, choice_texts)

        generate(model, fmt, prompts[:4], template.max_new_tokens, args.batch_size, desc="warm-up")  # both benefit
        samples, theirs_s = lm_eval_run(model, tok, "instructune_uci_gen", folder, args.batch_size)
        theirs = [fmt.clean_generation(s["resps"][0][0]) for s in samples]
        m_theirs = compute_metrics(template.type, theirs, refs, template.choices)[0][metric]
        for mode, until in (("generation", settled(template)), ("generation, to the end", None)):
            t0 = time.perf_counter()
            ours = generate(model, fmt, prompts, template.max_new_tokens, args.batch_size, desc=f"instructune {mode}",
                            settled=until)
            ours_s = time.perf_counter() - t0
            m_ours = compute_metrics(template.type, ours, refs, template.choices)[0][metric]
            if until:
                same = sum(parse_choice(a, template.choices) == parse_choice(b, template.choices)
                           for a, b in zip(ours, theirs)) / len(prompts)
                note = f"same choice {100 * same:.1f} %"
            else:
                same = sum(a.strip() == b.strip() for a, b in zip(ours, theirs)) / len(prompts)
                note = f"identical answers {100 * same:.1f} %"
            rows.append((mode, ours_s, theirs_s, m_ours, m_theirs, note))

        t0 = time.perf_counter()
        ours = classify_by_likelihood(model, fmt, prompts, template.choices, args.batch_size, desc="instructune likelihood")
        ours_s = time.perf_counter() - t0
        samples, theirs_s = lm_eval_run(model, tok, "instructune_uci_mc", folder, args.batch_size)
        picks = [template.choices[max(range(len(s["resps"])), key=lambda j: s["resps"][j][0][0])] for s in samples]
        same = sum(a == b for a, b in zip(ours, picks)) / len(prompts)
        m_ours = compute_metrics(template.type, ours, refs, template.choices)[0][metric]
        m_theirs = sum(s["acc"] for s in samples) / len(samples)
        rows.append(("log-likelihood", ours_s, theirs_s, m_ours, m_theirs, f"same choice {100 * same:.1f} %"))

    print(f"\nUCI sentiment test split ({len(prompts)} examples), {cfg.model.name}, fp32, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads\n")
    print(f"| mode | instructune s | lm-eval s | lm-eval / instructune | {metric} instructune | {metric} lm-eval | agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, a, b, ma, mb, note in rows:
        print(f"| {mode} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {ma:.4f} | {mb:.4f} | {note} |")
    if args.emails:
        emails(args.batch_size)


def emails(batch_size: int) -> None:
    """The e-mail subject 2-shot baseline: the longest prompts instructune evaluates in its real-data configs."""
    cfg = load_config(ROOT / "configs/email-subjects.yaml", [])
    prep = prepare(cfg)
    task = prep.tasks[0]
    model = load_for_inference(prep.model_source, cfg.model)
    test, train = task.pairs["test"][:32], task.pairs["train"]
    room = prep.context_length - task.template.max_new_tokens
    prompts = kshot_prompts(task.fmt, test, train, cfg.baseline.k, cfg.seed, task.name, room)
    lengths = [len(task.fmt.encode_prompt(p)) for p in prompts]
    t0 = time.perf_counter()
    preds = generate(model, task.fmt, prompts, task.template.max_new_tokens, batch_size, desc="e-mail 2-shot")
    seconds = time.perf_counter() - t0
    rouge = compute_metrics("summarization", preds, [p.completion for p in test])[0]["rougeL"]
    print(f"\ne-mail subjects, 2-shot baseline, 32 test prompts ({min(lengths)}-{max(lengths)} tokens, mean "
          f"{sum(lengths) / len(lengths):.0f}), max_new_tokens {task.template.max_new_tokens}, batch {batch_size}: "
          f"{seconds:.1f} s, rougeL {rouge:.4f}")


if __name__ == "__main__":
    main()
