"""results.json and report.md: base 0/1/k-shot and fine-tuned side by side, with the change in points and in %."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import InstructuneError
from ..evaluate.metrics import PRIMARY_METRIC


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
    finetuned = json.loads((run_dir / "finetuned.json").read_text())
    baseline = json.loads((run_dir / "baseline.json").read_text()) if (run_dir / "baseline.json").is_file() else {}
    manifest_path = run_dir / "model" / "instructune.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    types = {t["name"]: t["type"] for t in cfg["tasks"]}
    tasks = {}
    for name, ft in finetuned.items():
        variants = {**baseline.get(name, {}), **ft}
        primary = PRIMARY_METRIC[types[name]]
        base_names = [v for v in variants if v.startswith("base_")]
        best_base = max(base_names, key=lambda v: variants[v]["metrics"][primary]) if base_names else None
        tuned = variants["finetuned"]["metrics"]
        tasks[name] = {
            "type": types[name],
            "primary_metric": primary,
            "results": {v: r["metrics"] for v, r in variants.items()},
            "modes": {v: r["mode"] for v, r in variants.items()},
            "signatures": variants["finetuned"]["signatures"],
            "best_base": best_base,
            "change_vs_best_base": {m: change(variants[best_base]["metrics"][m], tuned[m]) for m in tuned} if best_base else {},
            "change": {v: {m: change(variants[v]["metrics"][m], tuned[m]) for m in tuned} for v in base_names},
            "improved": bool(best_base) and tuned[primary] > variants[best_base]["metrics"][primary],
            "n_test": len(variants["finetuned"]["predictions"]),
            "samples": _samples(variants, cfg.get("evaluate", {}).get("samples", 3)),
        }
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "train_log.jsonl").is_file() else []
    return {
        "experiment": cfg["name"],
        "model": {"name": cfg["model"]["name"], "source": manifest.get("base_model"), "method": cfg["train"]["method"],
                  "trainable_parameters": manifest.get("trainable_parameters"), "total_parameters": manifest.get("total_parameters")},
        "tasks": tasks,
        "training": {"steps": len(log), "final_loss": log[-1]["loss"] if log else None,
                     "val_loss": [{"step": e["step"], "val_loss": e["val_loss"]} for e in log if "val_loss" in e],
                     "tokens_per_s": log[-1]["tokens_per_s"] if log else None, "masking_audit": manifest.get("audit")},
        "data_fingerprint": manifest.get("data_fingerprint"),
        "versions": manifest.get("versions"),
    }


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
                  "| metric | " + " | ".join(v.replace("_", " ") for v in variants) + " | change vs best base (points) | change (%) |",
                  "|---" * (len(variants) + 3) + "|"]
        for metric in t["results"]["finetuned"]:
            if metric == "invalid_rate":
                continue
            c = t["change_vs_best_base"].get(metric, {})
            rel = "n/a" if c.get("relative_percent") is None else f"{c['relative_percent']:+.1f} %"
            star = " (primary)" if metric == t["primary_metric"] else ""
            lines.append(f"| {metric}{star} | " + " | ".join(f"{t['results'][v][metric]:.4f}" for v in variants)
                         + f" | {c.get('points', 0):+.2f} | {rel} |")
        lines += ["", f"Best base variant: `{t['best_base']}`. Outputs by greedy generation.", ""]
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
    lines += ["ROUGE is `rouge-score` with stemming (ROUGE-L is the longest common subsequence, not substring); "
              "BLEU and chrF are sacreBLEU (signatures above); QA is SQuAD-normalised exact match and token F1; "
              "NER is micro entity-level F1 on exact (text, type) matches.", ""]
    return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def write_report(run_dir: Path) -> dict:
    from ..experiment import atomic_write, write_json

    results = build_results(run_dir)
    write_json(Path(run_dir) / "results.json", results)
    atomic_write(Path(run_dir) / "report.md", render_markdown(results))
    return results
