"""results.json: every variant's metrics per task, the changes against the base model with paired-bootstrap
intervals, training, perplexity, leakage and forgetting, assembled from what the stages wrote in the run folder."""

from __future__ import annotations

from pathlib import Path

from .. import tasktypes
from ..config import ExperimentConfig
from ..errors import InstructuneError
from ..evaluate.stats import compare
from ..io import read_json, read_jsonl
from ..manifest import Manifest
from .sweep import sweep_results


def change(base: float, tuned: float) -> dict:
    """Absolute change in points (metric × 100) and relative change in % of the base; they are not the same thing."""
    return {"points": round(100 * (tuned - base), 4),
            "relative_percent": round(100 * (tuned - base) / base, 2) if base else None}


def build_results(run_dir: Path, cfg: ExperimentConfig) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "finetuned.json").is_file():
        raise InstructuneError("finetuned.json is missing: run the earlier stages first (`instructune run`)", str(run_dir))
    finetuned, baseline = read_json(run_dir / "finetuned.json"), read_json(run_dir / "baseline.json")
    manifest, stats = Manifest.read(run_dir / "model"), read_json(run_dir / "data_stats.json")
    boot = {"resamples": cfg.evaluate.bootstrap_resamples, "confidence": cfg.evaluate.confidence, "seed": cfg.seed}
    saved = manifest.templates(held_out=True)
    trained, held = {t.name: t.type for t in cfg.tasks}, {t.name: t.type for t in cfg.forgetting}
    tasks, forgetting, perplexity = {}, {}, {}
    for name, ft in finetuned.items():
        kind = trained.get(name) or held.get(name)
        if kind is None:
            continue
        base, ft = dict(baseline.get(name, {})), dict(ft)
        ppl = {"base": base.pop("perplexity", None), "finetuned": ft.pop("perplexity", None)}
        variants = {**base, **ft}
        choices = saved[name].choices if name in saved else None
        changes = {v: _changes(kind, variants[v], variants["finetuned"], choices, boot)
                   for v in variants if v.startswith("base_") or v == "classical"}
        if name in held:
            if "base_0shot" in changes:
                forgetting[name] = _forgetting(kind, variants, changes["base_0shot"])
            continue
        if ppl["base"] is not None or ppl["finetuned"] is not None:
            perplexity[name] = ppl
        tasks[name] = _task(kind, variants, changes, stats.get(name, {}), cfg.evaluate.samples)
    results = {
        "experiment": cfg.name,
        "model": {"name": cfg.model.name, "source": manifest.base_model,
                  "method": manifest.method or cfg.train.method,  # how the evaluated model was trained
                  "trainable_parameters": manifest.trainable_parameters, "total_parameters": manifest.total_parameters},
        "tasks": tasks,
        "statistics": {"method": "paired bootstrap over test items (Koehn 2004); corpus metrics recomputed from "
                                 "sufficient statistics on every resample", **boot},
        "training": _training(read_jsonl(run_dir / "train_log.jsonl"), manifest.audit),
        "perplexity": perplexity,
        "leakage": {n: s["leakage"] for n, s in stats.items() if s.get("leakage") is not None},
        "data_fingerprint": manifest.data_fingerprint,
        "versions": manifest.versions,
    }
    if held:
        results["forgetting"] = {"tasks": forgetting}
    if (sweep := sweep_results(run_dir, cfg, finetuned, {n: t.choices for n, t in saved.items()}, boot)) is not None:
        results["sweep"] = sweep  # `instructune sweep` chose the settings: its trials and what it bought
    return results


def _task(kind: str, variants: dict, changes: dict, stats: dict, samples: int) -> dict:
    """One trained task: every variant's metrics, the change of the fine-tuned model against each base variant."""
    primary = tasktypes.get(kind).primary_metric
    base_names = [v for v in variants if v.startswith("base_")]
    best_base = max(base_names, key=lambda v: variants[v]["metrics"][primary]) if base_names else None
    tuned = variants["finetuned"]["metrics"]
    return {
        "type": kind,
        "primary_metric": primary,
        "results": {v: r["metrics"] for v, r in variants.items()},
        "modes": {v: r["mode"] for v, r in variants.items()},
        "signatures": variants["finetuned"]["signatures"],
        "best_base": best_base,
        "change_vs_best_base": changes.get(best_base, {}),
        "change": changes,
        "improved": bool(best_base) and tuned[primary] > variants[best_base]["metrics"][primary],
        "classical": variants["classical"].get("method") if "classical" in variants else None,
        "beats_classical": tuned[primary] > variants["classical"]["metrics"][primary] if "classical" in variants else None,
        "best_prompt": variants["base_best_prompt"].get("choice") if "base_best_prompt" in variants else None,
        "n_test": len(variants["finetuned"]["predictions"]),
        "prompts_cut": variants["finetuned"].get("prompts_cut", 0),  # to training's max_length, as training cut them
        "samples": _samples(variants, samples),
        "token_lengths": stats.get("token_lengths"),
        "split_sizes": stats.get("sizes"),
    }


def _forgetting(kind: str, variants: dict, change_0shot: dict) -> dict:
    """A held-out task: its primary metric zero-shot before and after fine-tuning."""
    primary = tasktypes.get(kind).primary_metric
    return {"type": kind, "metric": primary, "before": variants["base_0shot"]["metrics"][primary],
            "after": variants["finetuned"]["metrics"][primary], "change": change_0shot[primary],
            "results": {v: variants[v]["metrics"] for v in ("base_0shot", "finetuned")}}


def _training(log: list[dict], audit: dict | None) -> dict:
    steps = [e for e in log if "loss" in e]
    return {"steps": steps[-1]["step"] if steps else 0, "final_loss": steps[-1]["loss"] if steps else None,
            "val_loss": [{"step": e["step"], "val_loss": e["val_loss"]} for e in log if "val_loss" in e],
            "tokens_per_s": steps[-1].get("tokens_per_s") if steps else None,
            "masking_audit": audit, "log": log}


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
