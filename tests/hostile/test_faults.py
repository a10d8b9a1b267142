"""Real file-system faults and signals: a full file system (a small tmpfs), a read-only one, SIGTERM.
Each ends in one line naming the path, the documented exit status, and no temporary file left behind."""

from __future__ import annotations

import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from instructune.cli import app


@pytest.fixture
def tmpfs(tmp_path):
    """A small real tmpfs of our own (needs root and a kernel that allows it; skipped, with the reason, elsewhere)."""
    mount = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()

    def make(size: str, readonly: bool = False) -> Path:
        options = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'})")
        return mount

    yield make
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith((".model.", ".checkpoint."))]


def test_a_full_file_system_names_the_path_and_leaves_no_temporary_file(tmp_path, tiny_model, tmpfs):
    fs = tmpfs("96k")
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["output_dir"] = str(fs / "run")
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and str(fs / "run") in result.output
    assert "Traceback" not in result.output
    assert leftovers(fs) == []
    assert not (fs / "run" / "results.json").exists()


def test_a_read_only_file_system_names_the_path(tmp_path, tiny_model, tmpfs):
    fs = tmpfs("1m", readonly=True)
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["output_dir"] = str(fs / "run")
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 1, result.output
    assert "Read-only file system" in result.output and str(fs / "run") in result.output
    assert "Traceback" not in result.output


def test_sigterm_ends_with_130_and_one_line(tmp_path, tiny_model):
    from test_runs import held_child  # the same real-CLI child that holds at a chosen point

    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model))
    proc = held_child(tmp_path, "import instructune.experiment as e\ne.run_baseline = lambda *a, **k: hold()", "run", config)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted") and "Traceback" not in err.decode()
    again = CliRunner().invoke(app, ["report", str(config)])  # the lock died with the process: not "another command"
    assert "another instructune command" not in again.output
