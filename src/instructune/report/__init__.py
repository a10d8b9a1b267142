"""The report stage: results.json, report.md and report.html from what the earlier stages wrote."""

from __future__ import annotations

from pathlib import Path

from ..config import ExperimentConfig
from ..io import atomic_write, write_json
from .html import write_html
from .markdown import render_markdown
from .results import build_results


def write_report(run_dir: Path, cfg: ExperimentConfig) -> dict:
    run_dir = Path(run_dir)
    results = build_results(run_dir, cfg)
    write_json(run_dir / "results.json", results)
    atomic_write(run_dir / "report.md", render_markdown(results))
    write_html(results, run_dir, cfg.model_dump(mode="json"))
    return results
