"""report.html: one self-contained page per run (inline CSS, charts as base64 PNG, no JavaScript, no external URL).

Every key beyond `experiment`, `model` and `tasks[*].results` is optional: older runs lack them and the page
shows what is there."""

from __future__ import annotations

import base64
import io
import re
from html import escape
from pathlib import Path

import yaml

from ..io import atomic_write
from .markdown import headline
from .sweep import sweep_html

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 auto;max-width:1200px;
 padding:1rem 1.5rem 3rem;color:#1d2330;background:#fff;line-height:1.45}
h1{margin:.2rem 0 .4rem;font-size:1.7rem}h2{border-bottom:2px solid #e3e7ef;padding-bottom:.2rem;margin-top:2rem}
h3{margin:1.3rem 0 .4rem}.meta{color:#4a5568;margin:.15rem 0}.note{color:#5a6475;font-size:.9rem}
code,pre{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.85rem}
pre{background:#f5f7fa;border:1px solid #e3e7ef;border-radius:4px;padding:.6rem;overflow-x:auto;white-space:pre-wrap}
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:.4rem 0 .8rem;font-size:.92rem}
th,td{border:1px solid #d8dde8;padding:.3rem .6rem;text-align:right;vertical-align:top}
th{background:#eef1f7}td.l,th.l{text-align:left}tr.mode td{color:#5a6475;font-size:.8rem;font-style:italic}
tr.primary td:first-child{font-weight:600}th.best{background:#dfe7fb}
td.significant{font-weight:700}td.significant.up{color:#146c2e;background:#e8f6ec}
td.significant.down{color:#a11d1d;background:#fbeaea}.badge{border-radius:3px;padding:0 .35rem;font-size:.8rem}
.good{background:#e8f6ec;color:#146c2e}.bad{background:#fbeaea;color:#a11d1d}
figure{margin:.6rem 0}figure img{max-width:100%;height:auto;border:1px solid #eef1f7}
figcaption{color:#5a6475;font-size:.85rem}
.sample{border:1px solid #d8dde8;border-radius:4px;margin:.6rem 0;padding:.4rem .6rem}
.outs{display:grid;gap:.4rem;margin-top:.3rem}.out{background:#f9fafc;border:1px solid #e8ebf2;border-radius:3px;
 padding:.3rem .45rem;overflow-wrap:anywhere;white-space:pre-wrap;font-size:.88rem}
.out b{display:block;font-size:.75rem;color:#5a6475;white-space:normal}.out.match{border-color:#7cc493}
.out.ref{background:#eef1f7}details summary{cursor:pointer;color:#33507a}
"""


def _e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _f(v, fmt: str = ".3f") -> str:
    return format(v, fmt) if _is_num(v) else "–"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-") or "task"


def _label(variant: str) -> str:
    return str(variant).replace("_", " ").replace("finetuned", "fine-tuned")


def _variants(results: dict) -> list[str]:
    """Base variants first in the order given, then any others, the fine-tuned one last."""
    names = list(results)
    base = [v for v in names if v.startswith("base")]
    rest = [v for v in names if v not in base and v != "finetuned"]
    return base + rest + (["finetuned"] if "finetuned" in names else [])


def _significant(c: dict) -> bool:
    if "significant" in c:
        return bool(c["significant"])
    lo, hi = c.get("ci_low"), c.get("ci_high")
    return _is_num(lo) and _is_num(hi) and (lo > 0 or hi < 0)


def _p(v) -> str:
    return "–" if not _is_num(v) else ("< 0.001" if v < 0.001 else f"{v:.3f}")


def _ci(c: dict) -> str:
    lo, hi = c.get("ci_low"), c.get("ci_high")
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" if _is_num(lo) and _is_num(hi) else "–"


def _change_cell(c: dict) -> str:
    pts = c.get("points")
    if not _is_num(pts):
        return "<td>–</td>"
    if _significant(c):
        up = pts >= 0
        return f'<td class="significant {"up" if up else "down"}">{"▲" if up else "▼"} {pts:+.2f}</td>'
    return f"<td>{pts:+.2f}</td>"


def _figure(draw, chart_id: str, alt: str, caption: str = "", width: float = 7.0, height: float = 3.2) -> str:
    """Draw on a fresh `Figure` (no pyplot global state, Agg canvas) and return an <img> with the PNG inline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    try:
        fig = Figure(figsize=(width, height), dpi=100)
        FigureCanvasAgg(fig)
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    except Exception as exc:  # a bad chart must not cost the whole report
        return f'<p class="note">Chart “{_e(alt)}” could not be drawn: {_e(type(exc).__name__)}: {_e(exc)}</p>'
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<figure><img id="{_e(chart_id)}" class="chart" alt="{_e(alt)}" '
            f'src="data:image/png;base64,{data}">{cap}</figure>')


def _primary_chart(tasks: dict, level: str) -> str:
    items = [(n, t) for n, t in tasks.items() if isinstance(t, dict) and t.get("results") and t.get("primary_metric")]
    if not items:
        return ""

    def draw(fig):
        cols = min(3, len(items))
        rows = (len(items) + cols - 1) // cols
        for i, (name, t) in enumerate(items):
            ax = fig.add_subplot(rows, cols, i + 1)
            res, metric = t["results"], t["primary_metric"]
            variants = [v for v in _variants(res) if _is_num((res.get(v) or {}).get(metric))]
            values = [res[v][metric] for v in variants]
            colors = ["#2f6fdb" if v == "finetuned" else ("#8fa9d6" if v == t.get("best_base") else "#c3cde0")
                      for v in variants]
            bars = ax.bar(range(len(variants)), values, color=colors)
            c = (t.get("change_vs_best_base") or {}).get(metric) or {}
            best = (res.get(t.get("best_base")) or {}).get(metric)
            if "finetuned" in variants and _is_num(best) and _is_num(c.get("ci_low")) and _is_num(c.get("ci_high")):
                j, tuned = variants.index("finetuned"), res["finetuned"][metric]
                err = [[max(0.0, tuned - (best + c["ci_low"]))], [max(0.0, best + c["ci_high"] - tuned)]]
                ax.errorbar([j], [tuned], yerr=err, fmt="none", ecolor="#1d2330", capsize=4)
            top = max([1.0] + [v * 1.1 for v in values])
            for b, v in zip(bars, values):  # the value at the foot of the bar, clear of the error bar
                inside = v > 0.12 * top
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, 0 if inside else v), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=8,
                            color="white" if inside and b.get_facecolor()[0] < 0.5 else "#1d2330")
            ax.set_xticks(range(len(variants)), [_label(v) for v in variants], rotation=20, fontsize=8)
            ax.set_title(f"{name}: {metric}", fontsize=10)
            ax.set_ylim(0, top)
            ax.spines[["top", "right"]].set_visible(False)

    cols = min(3, len(items))
    height = 3.3 * ((len(items) + cols - 1) // cols)
    return _figure(draw, "chart-primary", "primary metric per task: base variants vs fine-tuned",
                   "Primary metric on the test split. Error bar: " + level + " CI of the change vs the best base variant, "
                   "drawn around the fine-tuned score.", width=max(4.5, 3.8 * cols), height=height)


def _task_table(name: str, t: dict, level: str) -> str:
    res = t.get("results") or {}
    variants = _variants(res)
    primary, best, modes = t.get("primary_metric"), t.get("best_base"), t.get("modes") or {}
    metrics = list(dict.fromkeys(m for v in reversed(variants) for m in (res.get(v) or {})))
    if primary in metrics:
        metrics = [primary] + [m for m in metrics if m != primary]
    changes = t.get("change_vs_best_base") or {}
    head = "".join(f'<th class="best" title="best base variant">{_e(_label(v))} ★</th>' if v == best
                   else f"<th>{_e(_label(v))}</th>" for v in variants)
    out = ['<div class="scroll"><table class="metrics"><thead><tr><th class="l">metric</th>', head,
           f"<th>change vs best base (points)</th><th>{level} CI (points)</th><th>p</th></tr>"]
    if modes:
        out.append('<tr class="mode"><td class="l">mode</td>' + "".join(f"<td>{_e(modes.get(v, ''))}</td>" for v in variants)
                   + "<td></td><td></td><td></td></tr>")
    out.append("</thead><tbody>")
    for m in metrics:
        c = changes.get(m) or {}
        cls = ' class="primary"' if m == primary else ""
        out.append(f'<tr{cls}><td class="l">{_e(m)}{" (primary)" if m == primary else ""}</td>'
                   + "".join(f"<td>{_f((res.get(v) or {}).get(m), '.4f')}</td>" for v in variants)
                   + _change_cell(c) + f"<td>{_ci(c)}</td><td>{_p(c.get('p_value'))}</td></tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _lengths_chart(name: str, lengths: dict) -> str:
    series = [(k, [x for x in lengths.get(k) or [] if _is_num(x)]) for k in ("prompt", "completion")]
    series = [(k, xs) for k, xs in series if xs]
    if not series:
        return ""

    def draw(fig):
        for i, (kind, xs) in enumerate(series):
            ax = fig.add_subplot(1, len(series), i + 1)
            lo, hi = min(xs), max(xs)  # one bin per length when the range is small, else 30 bins
            bins = [b - 0.5 for b in range(int(lo), int(hi) + 2)] if hi - lo < 30 else 30
            ax.hist(xs, bins=bins, edgecolor="white", linewidth=0.5, color="#2f6fdb" if kind == "prompt" else "#d98c2f")
            ax.set_title(f"{kind} tokens (n={len(xs)}, max {max(xs)})", fontsize=10)
            ax.set_xlabel("tokens", fontsize=9)
            ax.spines[["top", "right"]].set_visible(False)

    return _figure(draw, f"chart-lengths-{_slug(name)}", f"token-length histograms for {name}", width=7.5, height=2.6)


def _samples(t: dict) -> str:
    samples = [s for s in t.get("samples") or [] if isinstance(s, dict)]
    if not samples:
        return ""
    order = _variants({k: None for k in samples[0] if k not in ("prompt", "reference")})
    out = ["<h3>Sample outputs</h3>"]
    for i, s in enumerate(samples, 1):
        ref = str(s.get("reference", "")).strip()
        cells = [f'<div class="out ref"><b>reference</b>{_e(s.get("reference"))}</div>']
        for v in order:
            match = " match" if ref and str(s.get(v, "")).strip() == ref else ""
            cells.append(f'<div class="out{match}"><b>{_e(_label(v))}</b>{_e(s.get(v))}</div>')
        out.append(f'<div class="sample"><details><summary>example {i}: prompt</summary><pre>{_e(s.get("prompt"))}</pre>'
                   f'</details><div class="outs" style="grid-template-columns:repeat({len(cells)},minmax(0,1fr))">'
                   + "".join(cells) + "</div></div>")
    return "".join(out)


def _task_section(name: str, t: dict, perplexity: dict | None, level: str) -> str:
    n = t.get("n_test")
    head = ", ".join(x for x in (_e(t.get("type")), f"{n} test examples" if _is_num(n) else "") if x)
    out = [f'<section class="task" id="task-{_e(_slug(name))}"><h2>{_e(name)}</h2>']
    if head:
        out.append(f'<p class="meta">{head}</p>')
    if "improved" in t:
        out.append('<p><span class="badge good">fine-tuned beats the best base variant</span></p>' if t["improved"]
                   else '<p><span class="badge bad">fine-tuned does not beat the best base variant</span></p>')
    out.append(_task_table(name, t, level))
    sigs = t.get("signatures") or {}
    if sigs:
        out.append('<ul class="note">' + "".join(f"<li><code>{_e(m)}</code>: {_e(s)}</li>" for m, s in sigs.items())
                   + "</ul>")
    if isinstance(perplexity, dict) and perplexity:
        out.append('<p class="meta">Perplexity on the test completions: '
                   + ", ".join(f"{_e(_label(k))} {_f(v, '.2f')}" for k, v in perplexity.items()) + "</p>")
    if isinstance(t.get("token_lengths"), dict):
        out.append("<h3>Token lengths</h3>" + _lengths_chart(name, t["token_lengths"]))
    out.append(_samples(t))
    out.append("</section>")
    return "".join(out)


def _training(tr: dict) -> str:
    if not isinstance(tr, dict) or not tr:
        return ""
    facts = [f"{tr['steps']} optimizer steps" if _is_num(tr.get("steps")) else "",
             f"final training loss {tr['final_loss']:.4f}" if _is_num(tr.get("final_loss")) else "",
             f"{tr['tokens_per_s']:.0f} tokens/s" if _is_num(tr.get("tokens_per_s")) else ""]
    out = ['<section id="training"><h2>Training</h2>']
    if any(facts):
        out.append(f'<p class="meta">{", ".join(f for f in facts if f)}.</p>')
    log = [e for e in tr.get("log") or [] if isinstance(e, dict) and _is_num(e.get("step"))]
    train = [(e["step"], e["loss"]) for e in log if _is_num(e.get("loss"))]
    val = [(e["step"], e["val_loss"]) for e in log if _is_num(e.get("val_loss"))] or \
          [(e["step"], e["val_loss"]) for e in tr.get("val_loss") or []
           if isinstance(e, dict) and _is_num(e.get("step")) and _is_num(e.get("val_loss"))]
    if train or val:
        def draw(fig):
            ax = fig.add_subplot(1, 1, 1)
            if train:
                ax.plot(*zip(*train), color="#2f6fdb", label="training loss", linewidth=1.4)
            if val:
                ax.plot(*zip(*val), color="#d98c2f", marker="o", label="validation loss", linewidth=1.4)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss")
            ax.legend(frameon=False)
            ax.spines[["top", "right"]].set_visible(False)
        out.append(_figure(draw, "chart-loss", "training and validation loss per optimizer step"))
    audit = tr.get("masking_audit")
    if isinstance(audit, dict) and _is_num(audit.get("tokens")) and _is_num(audit.get("supervised_tokens")):
        share = audit.get("supervised_share")
        out.append(f'<p class="meta">Masking audit: {audit["supervised_tokens"]:,} of {audit["tokens"]:,} training tokens '
                   f'supervised{f" ({100 * share:.1f} %)" if _is_num(share) else ""}'
                   f'{"; end-of-sequence trained" if audit.get("eos_supervised") else ""}.</p>')
    out.append("</section>")
    return "".join(out)


def _forgetting(fg, level: str) -> str:
    tasks = (fg or {}).get("tasks") if isinstance(fg, dict) else None
    if not tasks:
        return ""
    rows = []
    for name, f in tasks.items():
        f = f if isinstance(f, dict) else {}
        c = f.get("change") or {}
        rows.append(f'<tr><td class="l">{_e(name)}</td><td class="l">{_e(f.get("metric"))}</td>'
                    f'<td>{_f(f.get("before"), ".4f")}</td><td>{_f(f.get("after"), ".4f")}</td>{_change_cell(c)}'
                    f'<td>{_ci(c)}</td><td>{_p(c.get("p_value"))}</td></tr>')
    return ('<section id="forgetting"><h2>Forgetting (held-out tasks)</h2><div class="scroll"><table><thead><tr>'
            '<th class="l">task</th><th class="l">metric</th><th>before</th><th>after</th><th>change (points)</th>'
            f'<th>{level} CI (points)</th><th>p</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></div></section>")


def _leakage(lk) -> str:
    if not isinstance(lk, dict) or not lk:
        return ""
    rows, details = [], []
    for name, x in lk.items():
        x = x or {}
        rows.append(f'<tr><td class="l">{_e(name)}</td><td>{_e(x.get("exact", "–"))}</td>'
                    f'<td>{_e(x.get("near", "–"))}</td>'
                    f'<td>{_e(x.get("test_size", "–"))}</td></tr>')
        for ex in x.get("examples") or []:
            details.append(f'<div class="sample"><b>{_e(name)}</b>, overlap {_f(ex.get("overlap"), ".2f")}<div class="outs" '
                           f'style="grid-template-columns:1fr 1fr"><div class="out"><b>test</b>{_e(ex.get("test"))}</div>'
                           f'<div class="out"><b>train</b>{_e(ex.get("train"))}</div></div></div>')
    ex_html = (f"<details><summary>{len(details)} near-duplicate examples</summary>{''.join(details)}</details>"
               if details else "")
    return ('<section id="leakage"><h2>Train/test leakage</h2><table><thead><tr><th class="l">task</th><th>exact duplicates'
            '</th><th>near duplicates</th><th>test size</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
            + ex_html + "</section>")


def render_html(results: dict, config: dict | None = None) -> str:
    confidence = (results.get("statistics") or {}).get("confidence")
    level = f"{100 * confidence:.0f} %" if _is_num(confidence) else "95 %"
    m = results.get("model") or {}
    tasks = {k: v for k, v in (results.get("tasks") or {}).items() if isinstance(v, dict)}
    name = results.get("experiment", "experiment")
    params = ""
    tp, total = m.get("trainable_parameters"), m.get("total_parameters")
    if _is_num(tp):
        params = f"{tp:,} trainable parameters"
        if _is_num(total) and total:
            params += f" of {total:,} ({100 * tp / total:.2f} %)"
    meta = [f"Model <code>{_e(m.get('name'))}</code>" + (f" from <code>{_e(m['source'])}</code>" if m.get("source") else "")
            + (f", {_e(m['method'])} fine-tuning" if m.get("method") else ""), params,
            f"Data fingerprint <code>{_e(results['data_fingerprint'])}</code>" if results.get("data_fingerprint") else ""]
    body = [f"<header><h1>{_e(name)}: base model vs fine-tuned</h1>",
            "".join(f'<p class="meta">{x}</p>' for x in meta if x),
            f"<p><b>{_e(headline(tasks)) if tasks and all('improved' in t for t in tasks.values()) else ''}</b> "
            "Scores are 0–1 on the same test split; changes and their " + level + " confidence intervals are in points (×100). "
            "▲/▼ marks a change whose interval excludes zero.</p></header>"]
    if tasks:
        body.append('<section id="overview"><h2>Primary metric</h2>' + _primary_chart(tasks, level) + "</section>")
    perplexity = results.get("perplexity") or {}
    body += [_task_section(n, t, perplexity.get(n) if isinstance(perplexity, dict) else None, level) for n, t in tasks.items()]
    body += [sweep_html(results.get("sweep"), level, _figure), _training(results.get("training")),
             _forgetting(results.get("forgetting"), level), _leakage(results.get("leakage"))]
    config = config if config is not None else results.get("config")
    if config:
        dump = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        body.append(f'<section id="config"><h2>Configuration</h2><pre>{_e(dump)}</pre></section>')
    versions = results.get("versions")
    if isinstance(versions, dict) and versions:
        body.append('<section id="versions"><h2>Package versions</h2><table><tbody>'
                    + "".join(f'<tr><td class="l">{_e(k)}</td><td class="l">{_e(v)}</td></tr>' for k, v in versions.items())
                    + "</tbody></table></section>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f"<title>{_e(name)}: instructune report</title><style>{CSS}</style></head><body>"
            + "\n".join(b for b in body if b) + "</body></html>\n")


def write_html(results: dict, run_dir, config: dict | None = None) -> Path:
    """Write `run_dir/report.html` atomically; `config` (the resolved experiment config) is shown at the end."""
    path = Path(run_dir) / "report.html"
    atomic_write(path, render_html(results, config))
    return path
