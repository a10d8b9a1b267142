"""The HTML report: renders from minimal and full results, is self-contained, and shows in headless Chromium."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest

from instructune.report.html import render_html, write_html

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def minimal_results() -> dict:
    return {"experiment": "old-run", "model": {"name": "tiny"},
            "tasks": {"sentiment": {"primary_metric": "accuracy",
                                    "results": {"base_0shot": {"accuracy": 0.5}, "finetuned": {"accuracy": 0.75}}}}}


def _change(points: float, lo: float, hi: float, p: float) -> dict:
    return {"points": points, "relative_percent": None, "ci_low": lo, "ci_high": hi, "p_value": p,
            "significant": lo > 0 or hi < 0}


def full_results() -> dict:
    rng = random.Random(0)
    tickets = {
        "type": "classification", "primary_metric": "accuracy",
        "results": {"base_0shot": {"accuracy": 0.3, "macro_f1": 0.2, "invalid_rate": 0.4},
                    "base_1shot": {"accuracy": 0.35, "macro_f1": 0.28, "invalid_rate": 0.2},
                    "base_3shot": {"accuracy": 0.4, "macro_f1": 0.33, "invalid_rate": 0.1},
                    "finetuned": {"accuracy": 0.85, "macro_f1": 0.83, "invalid_rate": 0.0}},
        "modes": {"base_0shot": "generation", "base_1shot": "generation", "base_3shot": "likelihood",
                  "finetuned": "generation"},
        "signatures": {}, "best_base": "base_3shot",
        "change_vs_best_base": {"accuracy": _change(45.0, 0.30, 0.58, 0.0005),
                                "macro_f1": _change(50.0, 0.31, 0.66, 0.0004),
                                "invalid_rate": _change(-10.0, -0.2, 0.01, 0.07)},
        "change": {}, "improved": True, "n_test": 40,
        "samples": [{"prompt": "Classify the ticket.\nTicket: I was charged twice.\nCategory:", "reference": "billing",
                     "finetuned": "billing", "base_0shot": "<script>alert('x')</script>", "base_1shot": "refund",
                     "base_3shot": "billing"},
                    {"prompt": "Classify the ticket.\nTicket: The app crashes.\nCategory:", "reference": "technical",
                     "finetuned": "technical", "base_0shot": "The app crashes when", "base_1shot": "account",
                     "base_3shot": "delivery"}],
        "token_lengths": {"prompt": [rng.randint(40, 90) for _ in range(40)],
                          "completion": [rng.randint(1, 4) for _ in range(40)]}}
    summaries = {
        "type": "summarization", "primary_metric": "rougeL",
        "results": {"base_0shot": {"rougeL": 0.12, "bleu": 0.03}, "finetuned": {"rougeL": 0.21, "bleu": 0.06}},
        "modes": {"base_0shot": "generation", "finetuned": "generation"},
        "signatures": {"bleu": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"},
        "best_base": "base_0shot",
        "change_vs_best_base": {"rougeL": _change(9.0, -0.01, 0.19, 0.08), "bleu": _change(3.0, -0.02, 0.08, 0.2)},
        "improved": True, "n_test": 20,
        "samples": [{"prompt": "Summarize: the server restarted.", "reference": "Server restarted.",
                     "finetuned": "The server restarted.", "base_0shot": "Summarize: the server"}],
        "token_lengths": {"prompt": [rng.randint(80, 200) for _ in range(20)],
                          "completion": [rng.randint(5, 30) for _ in range(20)]}}
    log = [{"step": s, "epoch": s / 30, "loss": 3.2 * 0.9 ** s + 0.1, "lr": 1e-4, "tokens_per_s": 280.0}
           for s in range(1, 31)]
    for e in log:
        if e["step"] % 10 == 0:
            e["val_loss"] = e["loss"] + 0.15
    return {
        "experiment": "demo <b>run</b>",
        "model": {"name": "smollm2-135m", "source": "/models/smollm2", "method": "lora",
                  "trainable_parameters": 4884480, "total_parameters": 139400000},
        "tasks": {"support_tickets": tickets, "summaries": summaries},
        "training": {"steps": 30, "final_loss": log[-1]["loss"], "tokens_per_s": 290.0, "log": log,
                     "val_loss": [{"step": e["step"], "val_loss": e["val_loss"]} for e in log if "val_loss" in e],
                     "masking_audit": {"tokens": 1000, "supervised_tokens": 120, "supervised_share": 0.12,
                                       "eos_supervised": True}},
        "forgetting": {"tasks": {"held_out_qa": {"metric": "accuracy", "before": 0.6, "after": 0.55,
                                                 "change": _change(-5.0, -0.1, 0.0, 0.06)}}},
        "leakage": {"support_tickets": {"exact": 0, "near": 1, "test_size": 40,
                                        "examples": [{"test": "I was charged twice.", "train": "I was charged twice!",
                                                      "overlap": 0.85}]}},
        "perplexity": {"support_tickets": {"base": 12.3, "finetuned": 3.1}},
        "data_fingerprint": "ab12cd34", "versions": {"torch": "2.13.0", "transformers": "5.0.0"},
    }


CONFIG = {"name": "demo", "model": {"name": "smollm2-135m"}, "train": {"method": "lora", "epochs": 1}}


def test_render_minimal_and_full():
    page = render_html(minimal_results())
    assert "old-run" in page and "chart-primary" in page and "0.7500" in page

    page = render_html(full_results(), CONFIG)
    assert not re.search(r"https?://", page), "the report must not reference any external URL"
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "demo &lt;b&gt;run&lt;/b&gt;" in page
    for chart in ("chart-primary", "chart-loss", "chart-lengths-support_tickets", "chart-lengths-summaries"):
        assert f'id="{chart}"' in page
    assert 'class="significant up"' in page and "▲ +45.00" in page and "[+30.0, +58.0]" in page
    assert "likelihood" in page and "Forgetting" in page and "leakage" in page and "epochs: 1" in page
    assert page.index(">base 0shot<") < page.index(">base 1shot<") < page.index(">base 3shot") < page.index(">fine-tuned<")


def test_write_html_atomic_shows_the_config_it_is_given(tmp_path):
    (tmp_path / "config.yaml").write_text("name: from-disk\n")  # never re-read: the typed config is passed in
    path = write_html(minimal_results(), tmp_path, {"name": "given"})
    page = path.read_text()
    assert path == tmp_path / "report.html" and "given" in page and "from-disk" not in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "report.html"]  # no temporary file left


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make setup` installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the `test` extra")
    from PIL import Image

    path = write_html(full_results(), tmp_path, CONFIG)
    shot = tmp_path / "report.png"
    errors, requests = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(path.resolve().as_uri(), wait_until="load")
            charts = page.evaluate("""() => Array.from(document.querySelectorAll('img.chart')).map(
                img => ({id: img.id, alt: img.alt, complete: img.complete, width: img.naturalWidth}))""")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert not errors, f"console errors: {errors}"
    external = [u for u in requests if not u.startswith(("file:", "data:"))]
    assert not external, f"external requests: {external}"
    ids = {c["id"] for c in charts}
    assert {"chart-primary", "chart-loss", "chart-lengths-support_tickets"} <= ids
    assert all(c["complete"] and c["width"] > 0 and c["alt"] for c in charts), charts
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as img:
        colours = img.convert("RGB").resize((64, 64)).getcolors(maxcolors=64 * 64)
    assert colours is None or len(colours) > 10, "the screenshot is (almost) a single colour"
