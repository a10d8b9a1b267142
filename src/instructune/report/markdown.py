"""report.md: base 0/1/k-shot and fine-tuned side by side, with the change in points and in %, per task."""

from __future__ import annotations

from .sweep import sweep_markdown


def render_markdown(results: dict) -> str:
    level = f"{100 * results.get('statistics', {}).get('confidence', 0.95):.0f} %"
    lines = _header(results)
    for name, t in results["tasks"].items():
        lines += _task(name, t, level)
    lines += sweep_markdown(results.get("sweep"), level)
    lines += _training(results["training"])
    lines += _perplexity(results.get("perplexity"))
    lines += _leakage(results.get("leakage"))
    lines += _forgetting(results.get("forgetting"), level)
    lines += _method(results.get("statistics", {}))
    return "\n".join(lines)


def _header(results: dict) -> list[str]:
    m = results["model"]
    trainable = ""
    if m.get("trainable_parameters"):
        trainable = f", {m['trainable_parameters']:,} of {m['total_parameters']:,} weights trained " \
                    f"({100 * m['trainable_parameters'] / m['total_parameters']:.2f} %)"
    return [f"# {results['experiment']}: base model vs fine-tuned", "",
            f"Model `{m['name']}`, {m['method']} fine-tuning{trainable}. All metrics are on the same test split; "
            "scores are 0–1, changes are in points (×100) and in % of the best base variant's score."
            + (" The fine-tuned model was evaluated as trained: the base in 4 bits with the adapter on top. Exports "
               "add the adapter to the full-precision base instead; the GGUF/Ollama export's parity check lists the "
               "answers that differ from the evaluated model." if m["method"] == "qlora" else ""), "",
            f"**{headline(results['tasks'])}**", ""]


def headline(tasks: dict) -> str:
    """Which comparisons the report makes, and how they came out (primary metric)."""
    improved = sum(bool(t["improved"]) for t in tasks.values())
    line = f"Fine-tuned beats the best base variant (the base model prompted) on the primary metric in {improved} of " \
           f"{len(tasks)} tasks"
    classical = [t for t in tasks.values() if t.get("beats_classical") is not None]
    if classical:
        line += f", and the classical baseline (a simple method fitted on the same training split) in " \
                f"{sum(t['beats_classical'] for t in classical)} of {len(classical)}"
    return line + "."


def _task(name: str, t: dict, level: str) -> list[str]:
    variants = list(t["results"])
    lines = [f"## {name} ({t['type']}, {t['n_test']} test examples)", "",
             "| metric | " + " | ".join(v.replace("_", " ") for v in variants)
             + f" | change vs best base (points) | {level} CI (points) | p | change (%) |",
             "|---" * (len(variants) + 5) + "|"]
    lines += [_metric_row(t, metric, variants) for metric in t["results"]["finetuned"] if metric != "invalid_rate"]
    modes = sorted(set(t.get("modes", {}).values())) or ["generation"]
    lines += ["", f"Best base variant: `{t['best_base']}`. Answers by {' and '.join(modes)}"
              + (" (likelihood: the answer choice with the highest log-probability)" if "likelihood" in modes else
                 " (greedy)") + f". ✓/✗: the {level} interval of the change excludes zero.", ""]
    if t.get("prompts_cut"):
        lines.append(f"{t['prompts_cut']} of {t['n_test']} test prompts are longer than training's train.max_length "
                     "allows: the fine-tuned model read them cut as training cut them (the first token and the end).")
    if t.get("classical"):
        c = t["change"]["classical"].get(t["primary_metric"], {})
        lines.append(f"Classical baseline: {t['classical']['method']} {t['classical'].get('params') or ''}; "
                     f"fine-tuned vs classical {c.get('points', 0):+.2f} points, {level} CI {_ci(c)}.")
    if t.get("best_prompt"):
        bp = t["best_prompt"]
        lines.append(f"Best prompt of the base model: `{bp['template']}`, {bp['shots']}-shot, chosen on the validation "
                     f"split ({len(bp['tried'])} phrasing × shot settings tried; validation score {bp['validation']:.4f}).")
    lines += ["", *[f"- `{metric}`: {sig}" for metric, sig in t["signatures"].items()]]
    if t["samples"]:
        lines += ["", "Sample outputs:", ""]
        for i, s in enumerate(t["samples"], 1):
            lines.append(f"{i}. reference: {_one_line(s['reference'])}")
            lines += [f"   - {v.replace('_', ' ')}: {_one_line(s[v])}" for v in variants if v in s]
    return lines + [""]


def _metric_row(t: dict, metric: str, variants: list[str]) -> str:
    c = t["change_vs_best_base"].get(metric, {})
    rel = "n/a" if c.get("relative_percent") is None else f"{c['relative_percent']:+.1f} %"
    star = " (primary)" if metric == t["primary_metric"] else ""
    p = f"{c['p_value']:.3g}" if "p_value" in c else "n/a"
    mark = " **✓**" if c.get("significant") and c["points"] > 0 else (" **✗**" if c.get("significant") else "")
    return (f"| {metric}{star} | " + " | ".join(f"{t['results'][v][metric]:.4f}" for v in variants)
            + f" | {c.get('points', 0):+.2f}{mark} | {_ci(c)} | {p} | {rel} |")


def _ci(c: dict) -> str:
    return f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]" if "ci_low" in c else "n/a"


def _training(tr: dict) -> list[str]:
    if not tr["steps"]:
        return []
    lines = ["## Training", "", f"{tr['steps']} optimizer steps, final training loss {tr['final_loss']:.4f}, "
             f"{tr['tokens_per_s']:.0f} tokens/s."]
    if tr["val_loss"]:
        lines.append("Validation loss: " + ", ".join(f"step {v['step']}: {v['val_loss']:.4f}" for v in tr["val_loss"]) + ".")
    audit = tr.get("masking_audit")
    if audit:
        lines.append(f"Masking audit: {audit['supervised_tokens']:,} of {audit['tokens']:,} training tokens supervised "
                     f"({100 * audit['supervised_share']:.1f} %); prompt and padding masked; end-of-sequence trained.")
    return lines + [""]


def _perplexity(perplexity: dict | None) -> list[str]:
    if not perplexity:
        return []
    return ["## Perplexity on the validation split (completion tokens)", "", "| task | base | fine-tuned |", "|---|---|---|",
            *[f"| {n} | {_num(p['base'])} | {_num(p['finetuned'])} |" for n, p in perplexity.items()], ""]


def _leakage(leakage: dict | None) -> list[str]:
    if not leakage:
        return []
    return ["## Train/test leakage", "",
            *[f"- {n}: {lk['exact']} exact and {lk['near']} near-duplicate test input(s) of {lk['test_size']} "
              f"(≥ {100 * lk['threshold']:.0f} % of word 3-grams in one training input)" for n, lk in leakage.items()], ""]


def _forgetting(forgetting: dict | None, level: str) -> list[str]:
    if forgetting is None:
        return []
    lines = ["## Forgetting (held-out tasks, never trained on, zero-shot)", "",
             f"| task | metric | before | after | change (points) | {level} CI (points) | p |", "|---|---|---|---|---|---|---|"]
    for n, f in forgetting["tasks"].items():
        c = f["change"]
        lines.append(f"| {n} | {f['metric']} | {f['before']:.4f} | {f['after']:.4f} | {c['points']:+.2f} | {_ci(c)} | "
                     f"{c.get('p_value', float('nan')):.3g} |")
    return lines + [""]


def _method(st: dict) -> list[str]:
    lines = []
    if st.get("resamples"):
        lines += [f"Intervals: paired bootstrap over the test items, {st['resamples']} resamples, seed {st['seed']}, "
                  f"{100 * st['confidence']:.0f} % percentile intervals; p is two-sided.", ""]
    return lines + ["ROUGE is `rouge-score` with stemming (ROUGE-L is the longest common subsequence, not substring); "
                    "BLEU and chrF are sacreBLEU (signatures above); QA is SQuAD-normalised exact match and token F1; "
                    "NER is micro entity-level F1 on exact (text, type) matches.", ""]


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"
