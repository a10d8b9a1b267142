"""The run folder: instructune's own (a marker file says so), one writer at a time (a lock), and a record of what
each stage was made from, so a rerun never leaves old results beside new inputs and a report never mixes runs."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from .errors import InstructuneError
from .io import read_json, write_json
from .runtime import is_main_process, say

MARKER = ".instructune-run"
EXPORT_MARKER = ".instructune-export"  # in every folder `instructune export` made, listing its files
LOCK = ".lock"
STATUS = "run_status.json"
# what each stage writes, and which stages use its output
# (a sweep's folder describes how the model was chosen: a new training replaces it; `instructune sweep` keeps it)
OUTPUTS = {"baseline": ["baseline.json"], "train": ["model", "train_log.jsonl", "tensorboard", "export", "sweep"],
           "evaluate": ["finetuned.json"], "report": ["results.json", "report.md", "report.html"]}
DOWNSTREAM = {"baseline": ["report"], "train": ["evaluate", "report"], "evaluate": ["report"], "report": []}
_held: dict[str, object] = {}  # run folder -> its open lock file, held until the command ends (`release`)


def check_output_dir(run_dir: Path, key: str) -> Path:
    """Refuse a run folder that instructune must not write into (before anything is loaded or written)."""
    resolved = run_dir.expanduser().resolve()
    for forbidden, what in ((Path("/"), "the file system root"), (Path.home(), "your home folder"),
                            (Path.cwd(), "the working directory")):
        if resolved == forbidden.resolve():
            raise InstructuneError(f"refusing to use {what} as a run folder; name a folder of its own", f"{key}: {run_dir}")
    if run_dir.exists() and not run_dir.is_dir():
        raise InstructuneError("exists and is not a folder", f"{key}: {run_dir}")
    if run_dir.is_dir() and not (run_dir / MARKER).is_file() and any(run_dir.iterdir()):
        raise InstructuneError(f"this folder is not empty and was not made by instructune (no {MARKER} in it): "
                               "choose another output_dir or name; instructune never writes into a folder it did not "
                               "create", f"{key}: {run_dir}")
    return run_dir


def create(run_dir: Path, key: str) -> Path:
    """The run folder, made (or reused) as instructune's, and locked for this command. Under a launcher only
    process 0 does this (the others write nothing)."""
    if not is_main_process():
        return run_dir
    check_output_dir(run_dir, key)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / MARKER).is_file():
        write_json(run_dir / MARKER, {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "tool": "instructune",
                                      "note": "this folder is an instructune run; instructune rewrites what is in it"})
    lock(run_dir)
    return run_dir


def existing(run_dir: Path, key: str) -> Path:
    """A run folder an earlier stage made, locked for this process."""
    if not (run_dir / MARKER).is_file():
        raise InstructuneError("no instructune run here: run the earlier stages first (`instructune run`)", f"{key}: {run_dir}")
    lock(run_dir)
    return run_dir


def lock(run_dir: Path) -> None:
    """Hold an exclusive lock on the run folder until this process ends; a second command on it is refused."""
    key = str(run_dir.resolve())
    if key in _held:
        return
    f = open(run_dir / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise InstructuneError(f"another instructune command (PID {holder}) is writing this run folder; wait for it "
                               "to finish or use another output_dir", str(run_dir)) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held[key] = f


def release() -> None:
    """Let go of every run folder this process locked (the end of a command)."""
    while _held:
        _, f = _held.popitem()
        f.close()  # closing the file drops the flock


def status(run_dir: Path) -> dict:
    return read_json(run_dir / STATUS) or {"stages": {}}


def begin(run_dir: Path, stage: str, inputs: dict, keep: tuple[str, ...] = ()) -> str:
    """Start a stage: remove its old outputs (but `keep`) and those of every stage that used them, mark them
    incomplete, and return the id of this execution."""
    st = status(run_dir)
    for name in [stage, *DOWNSTREAM[stage]]:
        st["stages"].pop(name, None)
        for out in OUTPUTS[name]:
            if out in keep:
                continue
            path = run_dir / out
            if out == "export":
                remove_exports(path)
            else:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run_id = uuid.uuid4().hex[:12]
    st["stages"][stage] = {"complete": False, "id": run_id, "inputs": inputs,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(run_dir / STATUS, st)
    return run_id


def remove_exports(folder: Path) -> tuple[list[Path], list[Path]]:
    """Exports made from a model a retraining replaces are stale: remove the files each export's marker lists (a
    marker without a list: its whole folder, which the export replaced whole), keep every other file, say both.
    Returns (removed, kept)."""
    removed, kept = [], []
    for marker in sorted(folder.rglob(EXPORT_MARKER)) if folder.is_dir() else []:
        data = read_json(marker, "export marker")
        listed = data.get("files") if isinstance(data, dict) else None
        targets = ([marker.parent / n for n in listed if isinstance(n, str) and n not in ("", ".", "..")
                    and "/" not in n and "\\" not in n] if isinstance(listed, list) else [marker.parent])
        for path in targets:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            removed.append(path)
    for path in sorted(folder.rglob("*"), reverse=True) if folder.is_dir() else []:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        elif path.is_file():
            kept.append(path)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if removed:
        say(f"retraining: removed the exports of the previous model ({', '.join(str(p) for p in removed[:8])}"
            f"{', ...' if len(removed) > 8 else ''})")
    if kept:
        say(f"retraining: kept {len(kept)} file(s) no export wrote in {folder} ({', '.join(p.name for p in kept[:5])})")
    return removed, sorted(kept)


def finish(run_dir: Path, stage: str, **extra) -> None:
    st = status(run_dir)
    st["stages"][stage].update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
    write_json(run_dir / STATUS, st)


def require(run_dir: Path, stage: str, inputs: dict | None = None) -> dict:
    """The record of a completed stage whose inputs (the keys given) are still `inputs`, or an error naming the
    stage to rerun."""
    record = status(run_dir)["stages"].get(stage)
    if not record or not record.get("complete"):
        raise InstructuneError(f"the {stage} stage is not complete in this run folder: run `instructune {stage} "
                               "CONFIG` (or `instructune run CONFIG`)", str(run_dir))
    changed = differences({k: record["inputs"].get(k) for k in inputs or {}}, inputs or {})
    if changed:
        raise InstructuneError(f"the {stage} stage was made from other inputs (changed since: {'; '.join(changed)}): "
                               f"rerun `instructune {stage} CONFIG`", str(run_dir))
    return record


def differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like trees, with both values (short)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str) if k != "step"
                for d in differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))]
    if old != new:
        return [f"{prefix}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
