"""results.json and report.md: base 0/1/k-shot and fine-tuned side by side, with the change in points and in %."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import InstructuneError
from ..evaluate.metrics import PRIMARY_METRIC
from ..evaluate.stats import compare


def change(base: float, tuned: float) -> dict:
    """Absolute change in points (metric × 100) and relative change in % of the base; they are not the same thing."""
    return {"points": round(100 * (tuned - base), 4),
            "relative_percent": round(100 * (tuned - base) / base, 2) if base else None}


def build_results(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    for name in ("finetuned.json", "config.yaml"):
        if not (run_dir / name).is_file():
            raise InstructuneError(f"{name} is missing: run the earlier stages first (`instructune run`)", str(run_dir))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    finetuned = _read(run_dir / "finetuned.json")
    baseline = _read(run_dir / "baseline.json")
    manifest = _read(run_dir / "model" / "instructune.json")
    stats = _read(run_dir / "data_stats.json")
    ev = cfg.get("evaluate", {})
    boot = {"resamples": ev.get("bootstrap_resamples", 2000), "confidence": ev.get("confidence", 0.95), "seed": cfg.get("seed", 0)}
    saved = {**manifest.get("tasks", {}), **manifest.get("held_out_tasks", {})}
    trained = {t["name"]: t["type"] for t in cfg["tasks"]}
    held = {t["name"]: t["type"] for t in cfg.get("forgetting") or []}
    tasks, forgetting, perplexity = {}, {}, {}
    for name, ft in finetuned.items():
        base = dict(baseline.get(name, {}))
        ft = dict(ft)
        ppl = {"base": base.pop("perplexity", None), "finetuned": ft.pop("perplexity", None)}
        variants = {**base, **ft}
        kind = trained.get(name) or held.get(name)
        if kind is None:
            continue
        primary = PRIMARY_METRIC[kind]
        choices = saved.get(name, {}).get("choices")
        base_names = [v for v in variants if v.startswith("base_")]
        tuned = variants["finetuned"]["metrics"]
        changes = {v: _changes(kind, variants[v], variants["finetuned"], choices, boot) for v in base_names}
        if name in held:
            if "base_0shot" in changes:
                forgetting[name] = {"type": kind, "metric": primary, "before": variants["base_0shot"]["metrics"][primary],
                                    "after": tuned[primary], "change": changes["base_0shot"][primary],
                                    "results": {v: variants[v]["metrics"] for v in ("base_0shot", "finetuned")}}
            continue
        if ppl["base"] is not None or ppl["finetuned"] is not None:
            perplexity[name] = ppl
        best_base = max(base_names, key=lambda v: variants[v]["metrics"][primary]) if base_names else None
        tasks[name] = {
            "type": kind,
            "primary_metric": primary,
            "results": {v: r["metrics"] for v, r in variants.items()},
            "modes": {v: r["mode"] for v, r in variants.items()},
            "signatures": variants["finetuned"]["signatures"],
            "best_base": best_base,
            "change_vs_best_base": changes.get(best_base, {}),
            "change": changes,
            "improved": bool(best_base) and tuned[primary] > variants[best_base]["metrics"][primary],
            "n_test": len(variants["finetuned"]["predictions"]),
            "samples": _samples(variants, ev.get("samples", 3)),
            "token_lengths": stats.get(name, {}).get("token_lengths"),
            "split_sizes": stats.get(name, {}).get("sizes"),
        }
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "train_log.jsonl").is_file() else []
    steps = [e for e in log if "loss" in e]
    results = {
        "experiment": cfg["name"],
        "model": {"name": cfg["model"]["name"], "source": manifest.get("base_model"), "method": cfg["train"]["method"],
                  "trainable_parameters": manifest.get("trainable_parameters"), "total_parameters": manifest.get("total_parameters")},
        "tasks": tasks,
        "statistics": {"method": "paired bootstrap over test items (Koehn 2004); corpus metrics recomputed from "
                                 "sufficient statistics on every resample", **boot},
        "training": {"steps": steps[-1]["step"] if steps else 0, "final_loss": steps[-1]["loss"] if steps else None,
                     "val_loss": [{"step": e["step"], "val_loss": e["val_loss"]} for e in log if "val_loss" in e],
                     "tokens_per_s": steps[-1].get("tokens_per_s") if steps else None,
                     "masking_audit": manifest.get("audit"), "log": log},
        "perplexity": perplexity,
        "leakage": {n: s["leakage"] for n, s in stats.items() if s.get("leakage") is not None},
        "data_fingerprint": manifest.get("data_fingerprint"),
        "versions": manifest.get("versions"),
    }
    if held:
        results["forgetting"] = {"tasks": forgetting}
    return results


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _changes(kind: str, base: dict, tuned: dict, choices, boot: dict) -> dict:
    """Per metric: the change in points and %, and the paired bootstrap CI (metric units) and p-value."""
    out = {m: change(base["metrics"][m], tuned["metrics"][m]) for m in tuned["metrics"] if m in base["metrics"]}
    if boot["resamples"]:
        refs = [p["reference"] for p in tuned["predictions"]]
        cis = compare(kind, [p["prediction"] for p in base["predictions"]], [p["prediction"] for p in tuned["predictions"]],
                      refs, choices, boot["resamples"], boot["seed"], boot["confidence"])
        for m, ci in cis.items():
            if m in out:
                out[m].update({k: ci[k] for k in ("ci_low", "ci_high", "p_value", "significant")})
    return out


def _samples(variants: dict, n: int) -> list[dict]:
    tuned = variants["finetuned"]["predictions"]
    out = []
    for i in range(min(n, len(tuned))):
        row = {"prompt": tuned[i]["prompt"], "reference": tuned[i]["reference"], "finetuned": tuned[i]["prediction"]}
        for v, r in variants.items():
            if v.startswith("base_"):
                row[v] = r["predictions"][i]["prediction"]
        out.append(row)
    return out


def render_markdown(results: dict) -> str:
    m = results["model"]
    lines = [f"# {results['experiment']}: base model vs fine-tuned", ""]
    trainable = ""
    if m.get("trainable_parameters"):
        trainable = f", {m['trainable_parameters']:,} of {m['total_parameters']:,} weights trained " \
                    f"({100 * m['trainable_parameters'] / m['total_parameters']:.2f} %)"
    lines += [f"Model `{m['name']}`, {m['method']} fine-tuning{trainable}. All metrics are on the same test split; "
              "scores are 0–1, changes are in points (×100) and in % of the best base variant's score.", ""]
    improved = sum(t["improved"] for t in results["tasks"].values())
    lines += [f"**Fine-tuned beats the best base variant on the primary metric in {improved} of {len(results['tasks'])} tasks.**", ""]
    for name, t in results["tasks"].items():
        variants = list(t["results"])
        lines += [f"## {name} ({t['type']}, {t['n_test']} test examples)", "",
                  "| metric | " + " | ".join(v.replace("_", " ") for v in variants)
                  + " | change vs best base (points) | 95 % CI (points) | p | change (%) |",
                  "|---" * (len(variants) + 5) + "|"]
        for metric in t["results"]["finetuned"]:
            if metric == "invalid_rate":
                continue
            c = t["change_vs_best_base"].get(metric, {})
            rel = "n/a" if c.get("relative_percent") is None else f"{c['relative_percent']:+.1f} %"
            star = " (primary)" if metric == t["primary_metric"] else ""
            ci = f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]" if "ci_low" in c else "n/a"
            p = f"{c['p_value']:.3g}" if "p_value" in c else "n/a"
            mark = " **✓**" if c.get("significant") and c["points"] > 0 else (" **✗**" if c.get("significant") else "")
            lines.append(f"| {metric}{star} | " + " | ".join(f"{t['results'][v][metric]:.4f}" for v in variants)
                         + f" | {c.get('points', 0):+.2f}{mark} | {ci} | {p} | {rel} |")
        modes = sorted(set(t.get("modes", {}).values())) or ["generation"]
        lines += ["", f"Best base variant: `{t['best_base']}`. Answers by {' and '.join(modes)}"
                  + (" (likelihood: the answer choice with the highest log-probability)" if "likelihood" in modes else
                     " (greedy)") + ". ✓/✗: the 95 % interval of the change excludes zero.", ""]
        for metric, sig in t["signatures"].items():
            lines.append(f"- `{metric}`: {sig}")
        if t["samples"]:
            lines += ["", "Sample outputs:", ""]
            for i, s in enumerate(t["samples"], 1):
                lines.append(f"{i}. reference: {_one_line(s['reference'])}")
                for v in variants:
                    key = "finetuned" if v == "finetuned" else v
                    if key in s:
                        lines.append(f"   - {v.replace('_', ' ')}: {_one_line(s[key])}")
        lines.append("")
    tr = results["training"]
    if tr["steps"]:
        lines += ["## Training", "", f"{tr['steps']} optimizer steps, final training loss {tr['final_loss']:.4f}, "
                  f"{tr['tokens_per_s']:.0f} tokens/s."]
        if tr["val_loss"]:
            lines.append("Validation loss: " + ", ".join(f"step {v['step']}: {v['val_loss']:.4f}" for v in tr["val_loss"]) + ".")
        audit = tr.get("masking_audit")
        if audit:
            lines.append(f"Masking audit: {audit['supervised_tokens']:,} of {audit['tokens']:,} training tokens supervised "
                         f"({100 * audit['supervised_share']:.1f} %); prompt and padding masked; end-of-sequence trained.")
        lines.append("")
    if results.get("perplexity"):
        lines += ["## Perplexity on the validation split (completion tokens)", "", "| task | base | fine-tuned |", "|---|---|---|"]
        lines += [f"| {n} | {_num(p['base'])} | {_num(p['finetuned'])} |" for n, p in results["perplexity"].items()]
        lines.append("")
    if results.get("leakage"):
        lines += ["## Train/test leakage", ""]
        for n, lk in results["leakage"].items():
            lines.append(f"- {n}: {lk['exact']} exact and {lk['near']} near-duplicate test input(s) of {lk['test_size']} "
                         f"(≥ {100 * lk['threshold']:.0f} % of word 3-grams in one training input)")
        lines.append("")
    if "forgetting" in results:
        lines += ["## Forgetting (held-out tasks, never trained on, zero-shot)", "",
                  "| task | metric | before | after | change (points) | 95 % CI (points) | p |", "|---|---|---|---|---|---|---|"]
        for n, f in results["forgetting"]["tasks"].items():
            c = f["change"]
            ci = f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]" if "ci_low" in c else "n/a"
            lines.append(f"| {n} | {f['metric']} | {f['before']:.4f} | {f['after']:.4f} | {c['points']:+.2f} | {ci} | "
                         f"{c.get('p_value', float('nan')):.3g} |")
        lines.append("")
    st = results.get("statistics", {})
    if st.get("resamples"):
        lines += [f"Intervals: paired bootstrap over the test items, {st['resamples']} resamples, seed {st['seed']}, "
                  f"{100 * st['confidence']:.0f} % percentile intervals; p is two-sided.", ""]
    lines += ["ROUGE is `rouge-score` with stemming (ROUGE-L is the longest common subsequence, not substring); "
              "BLEU and chrF are sacreBLEU (signatures above); QA is SQuAD-normalised exact match and token F1; "
              "NER is micro entity-level F1 on exact (text, type) matches.", ""]
    return "\n".join(lines)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def write_report(run_dir: Path) -> dict:
    from ..experiment import atomic_write, write_json

    from .html import write_html

    results = build_results(run_dir)
    write_json(Path(run_dir) / "results.json", results)
    atomic_write(Path(run_dir) / "report.md", render_markdown(results))
    write_html(results, run_dir)
    return results
