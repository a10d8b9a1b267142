"""Shared by the hostile-input tests: drive the CLI on a config, and check that bad input ends cleanly (exit 2, one
line naming the file:line or key, no traceback, no run folder, the user's files byte-identical)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from typer.testing import CliRunner

from conftest import tiny_config, write_config, write_jsonl
from instructune.cli import app


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    out = result.output
    try:
        if result.stderr not in out:  # older click keeps stderr apart from output
            out += result.stderr
    except ValueError:  # stderr not captured separately
        pass
    return result.exit_code, out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(tmp_path: Path, cfg: dict, *fragments: str, command: tuple[str, ...] = ("data", "lint"),
            extra: tuple[str, ...] = ()) -> str:
    """Run `command` on cfg; assert exit 2, every fragment in the output, no traceback, no run folder and the data
    files untouched. Returns the output."""
    config = write_config(tmp_path, cfg)
    data = tmp_path / "data"
    before = snapshot(data) if data.exists() else {}
    code, out = run_cli(*command, config, *extra)
    assert code == 2, out
    for fragment in fragments:
        assert fragment in out, out
    assert "Traceback" not in out, out
    assert out.count("error:") == 1, out  # one line, not a cascade
    assert not (tmp_path / "run").exists(), "a run folder was written for bad input"
    assert (snapshot(data) if data.exists() else {}) == before, "a data file was changed"
    return out


def accepted(tmp_path: Path, cfg: dict) -> str:
    code, out = run_cli("data", "lint", write_config(tmp_path, cfg))
    assert code == 0, out
    return out


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def with_row(cfg: dict, split: str, index: int, change, task: int = 0) -> str:
    """Rewrite one row of a split's JSONL file, changed in place by `change(row)`; returns the file's path."""
    path = cfg["tasks"][task]["data"][split]
    rows = rows_of(path)
    change(rows[index])
    write_jsonl(path, rows)
    return path


class Bounded:
    """Wall time and peak-memory growth of a block (ru_maxrss is the process's high-water mark, in KiB on Linux)."""

    def __enter__(self):
        self.t0, self.rss0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        self.seconds = time.monotonic() - self.t0
        self.grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss0) / 1024
        return False


__all__ = ["run_cli", "snapshot", "refused", "accepted", "rows_of", "with_row", "Bounded", "tiny_config",
           "write_config", "write_jsonl"]
