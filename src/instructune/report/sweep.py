"""The sweep in the report: every trial's settings and validation score, the chosen and the default-settings trial,
what the search bought on the test split (chosen vs default, paired bootstrap) and what it cost (its time), and a
plot of the validation score against the most important setting."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from .. import tasktypes
from ..config import ExperimentConfig
from ..evaluate.stats import compare
from ..io import read_json


def sweep_results(run_dir: Path, cfg: ExperimentConfig, finetuned: dict, choices: dict, boot: dict) -> dict | None:
    """results.json's `sweep`: sweep/sweep.json and, per trained task, the chosen model's test score against the
    default settings' model's (sweep/default/finetuned.json; the same model when trial 0 was chosen). None: no sweep."""
    record = read_json(Path(run_dir) / "sweep" / "sweep.json")
    if not record:
        return None
    default = read_json(Path(run_dir) / "sweep" / "default" / "finetuned.json")
    test = {}
    for task in cfg.tasks:
        chosen = finetuned.get(task.name, {}).get("finetuned")
        if chosen is None:
            continue
        own = default.get(task.name, {}).get("finetuned", chosen) if record["chosen"] != record["default"] else chosen
        metric = tasktypes.get(task.type).primary_metric
        change = _paired(task.type, own, chosen, choices.get(task.name), boot, metric)
        test[task.name] = {"metric": metric, "chosen": chosen["metrics"][metric], "default": own["metrics"][metric],
                           "change": change}
    importance = record.get("importance") or {}
    searched = list(record.get("space") or {})
    return {**record, "test": test, "most_important": max(importance, key=importance.get) if importance else
            (searched[0] if searched else None)}


def _paired(kind: str, own: dict, chosen: dict, choices, boot: dict, metric: str) -> dict:
    """The chosen model's change over the default's on the same test items: points and the paired bootstrap CI."""
    out = {"points": round(100 * (chosen["metrics"][metric] - own["metrics"][metric]), 4)}
    if boot["resamples"]:
        ci = compare(kind, [p["prediction"] for p in own["predictions"]], [p["prediction"] for p in chosen["predictions"]],
                     [p["reference"] for p in chosen["predictions"]], choices, boot["resamples"], boot["seed"],
                     boot["confidence"])[metric]
        out.update({k: ci[k] for k in ("ci_low", "ci_high", "p_value", "significant")})
    return out


def _e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def _clock(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _summary(sw: dict, level: str) -> list[str]:
    """Sentences: the objective, how the search ran, its time, and the chosen trial against the default."""
    trials = sw["trials"]
    kinds = [t["outcome"].split(":")[0] for t in trials]  # "not run: estimated 410 s, ..." counts as "not run"
    counts = {o: kinds.count(o) for o in dict.fromkeys(kinds)}
    budget = f" of a {_clock(sw['budget_seconds'])} budget" if sw.get("budget_seconds") else ""
    lines = [f"Objective: {sw['objective']}. Sampler {sw['sampler']}; {sw['pruner']}. {len(trials)} trials ("
             + ", ".join(f"{n} {o}" for o, n in counts.items()) + f") in {_clock(sw['search_seconds'])}{budget}. "
             f"Trial {sw['default']} ran the config's own settings; trial {sw['chosen']} was chosen (best validation "
             "score) and is the run's model."]
    for name, t in sw["test"].items():
        c = t["change"]
        ci = (f", {level} CI [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}], p {c['p_value']:.3g}"
              if "ci_low" in c else "")
        lines.append(f"{name}: test {t['metric']} {t['chosen']:.4f} with the chosen settings vs {t['default']:.4f} with "
                     f"the config's own: {c.get('points', 0):+.2f} points{ci}"
                     + (" (the config's own settings were chosen)" if sw["chosen"] == sw["default"] else "") + ".")
    return lines


def sweep_markdown(sw: dict | None, level: str) -> list[str]:
    if not sw:
        return []
    keys = list(sw.get("space") or {})
    lines = ["## Settings search (`instructune sweep`)", "", *_summary(sw, level), "",
             "| trial | " + " | ".join(f"`{k}`" for k in keys) + " | validation (per evaluation) | outcome | seconds "
             "| tokens |", "|---" * (len(keys) + 5) + "|"]
    for t in sw["trials"]:
        mark = " **chosen**" if t["number"] == sw["chosen"] else (" (default)" if t["default"] else "")
        evals = ", ".join(f"{e['value']:.3f}" for e in t.get("evaluations") or [])
        lines.append(f"| {t['number']}{mark} | " + " | ".join(_value(t["params"].get(k, "")) for k in keys)
                     + f" | {evals or '–'} | {t['outcome']} | {_clock(t.get('seconds'))} | {t.get('tokens') or 0:,} |")
    if sw.get("importance"):
        lines += ["", "Importance (fANOVA share of the validation score's variance): "
                  + ", ".join(f"`{k}` {v:.2f}" for k, v in sw["importance"].items()) + "."]
    else:
        lines += ["", "Importance: not stated, too few complete trials for fANOVA to rank the settings."]
    return lines + [""]


def sweep_html(sw: dict | None, level: str, figure) -> str:
    """The section of report.html; `figure(draw, id, alt, caption)` is the page's chart helper (an inline PNG)."""
    if not sw:
        return ""
    keys = list(sw.get("space") or {})
    rows = []
    for t in sw["trials"]:
        cls = ' class="primary"' if t["number"] == sw["chosen"] else ""
        mark = " (chosen)" if t["number"] == sw["chosen"] else (" (default)" if t["default"] else "")
        evals = ", ".join(f"{e['value']:.3f}" for e in t.get("evaluations") or [])
        rows.append(f"<tr{cls}><td>{t['number']}{mark}</td>" + "".join(f"<td>{_e(_value(t['params'].get(k, '')))}</td>"
                                                                       for k in keys)
                    + f"<td>{'–' if t.get('value') is None else format(t['value'], '.4f')}</td><td class=\"l\">{_e(evals or '–')}</td>"
                    f"<td class=\"l\">{_e(t['outcome'])}</td><td>{_e(_clock(t.get('seconds')))}</td>"
                    f"<td>{t.get('tokens') or 0:,}</td></tr>")
    head = ("<tr><th>trial</th>" + "".join(f"<th>{_e(k)}</th>" for k in keys) + "<th>validation</th>"
            '<th class="l">per evaluation</th><th class="l">outcome</th><th>time</th><th>tokens</th></tr>')
    return ('<section id="sweep"><h2>Settings search</h2>' + "".join(f'<p class="meta">{_e(x)}</p>'
                                                                    for x in _summary(sw, level))
            + f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
            + _plot(sw, figure) + "</section>")


def _plot(sw: dict, figure) -> str:
    """Validation score of each finished trial against the most important setting (log axis for a log range)."""
    key = sw.get("most_important")
    points = [(t["params"].get(key), t["value"], t) for t in sw["trials"]
              if key and t.get("value") is not None and t["params"].get(key) is not None]
    if not points:
        return ""
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
    labels = sorted({str(x) for x, _, _ in points})

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        xs = [x if numeric else labels.index(str(x)) for x, _, _ in points]
        ax.scatter(xs, [v for _, v, _ in points], color="#2f6fdb", label="trial")
        for x, (_, v, t) in zip(xs, points):
            if t["number"] in (sw["chosen"], sw["default"]):
                ax.scatter([x], [v], s=120, facecolors="none", edgecolors="#d98c2f" if t["number"] == sw["chosen"]
                           else "#444", linewidths=2, label="chosen" if t["number"] == sw["chosen"] else "default")
        if numeric and (sw.get("space", {}).get(key) or {}).get("log") and min(xs) > 0:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel("validation score")
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
        ax.legend(handles.values(), handles.keys(), frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    finite = [v for _, v, _ in points if isinstance(v, (int, float)) and math.isfinite(v)]
    return figure(draw, "chart-sweep", f"validation score against {key}",
                   f"{len(finite)} finished trials; {key} is the setting with the largest fANOVA importance"
                   if sw.get("importance") else f"{len(finite)} finished trials")
