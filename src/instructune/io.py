"""Writing files so that a reader never sees half of one: atomic text and JSON files, folders replaced whole."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InstructuneError


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, then rename it over `path` (the temporary file never outlives a failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only: name the file meant, not the temporary one
        e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    """Strict JSON (no NaN or Infinity tokens): a non-finite number is written as null, and a top-level object
    lists each such key under `non_finite` with the value it had, so a missing number always says why."""
    clean, notes = finite(obj)
    if notes and isinstance(clean, dict):
        clean["non_finite"] = notes
    atomic_write(path, json.dumps(clean, indent=2, ensure_ascii=False, allow_nan=False))


def finite(obj, where: str = "") -> tuple[object, dict[str, str]]:
    """`obj` with every non-finite float replaced by None, and {dotted key: "nan" / "inf" / "-inf"} of those."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, {where or ".": repr(obj)}
    notes: dict[str, str] = {}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k], more = finite(v, f"{where}.{k}" if where else str(k))
            notes.update(more)
        return out, notes
    if isinstance(obj, (list, tuple)):
        out = []
        for i, v in enumerate(obj):
            item, more = finite(v, f"{where}.{i}" if where else str(i))
            out.append(item)
            notes.update(more)
        return out, notes
    return obj, notes


def read_json(path: Path, key: str | None = None):
    """The JSON in `path`, or {} when there is no such file; a file that cannot be read as JSON (not UTF-8, not
    JSON, nested too deep) is an InstructuneError naming the file and line (after `key`, the setting that named it)."""
    path = Path(path)
    if not path.is_file():
        return {}
    prefix = f"{key}: " if key else ""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InstructuneError(f"not UTF-8 text (byte {e.start}): the file is damaged", f"{prefix}{path}") from None
    except json.JSONDecodeError as e:
        raise InstructuneError(f"not valid JSON ({e.msg}, column {e.colno}): the file is damaged or incomplete",
                               f"{prefix}{path}:{e.lineno}") from None
    except RecursionError:
        raise InstructuneError("JSON nested too deep to read", f"{prefix}{path}") from None


def read_jsonl(path: Path) -> list:
    """The JSON value on each non-blank line of `path` (a JSON-lines file such as the training log), or []."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else []


@contextlib.contextmanager
def replaced_folder(target: Path, keep_old: bool = False):
    """A temporary sibling folder to write into; once the block ends without error it replaces `target` whole.

    The old folder is renamed aside (`<name>.old`) before the new one moves in, so a kill at any moment leaves one
    complete folder: the new one, the old one, or the old one as `<name>.old`. `<name>.old` is then removed, or, with
    `keep_old`, kept as the previous complete copy (checkpoints: if the newest is damaged, the one before it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        old = old_copy(target)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)  # a stale copy: `target` is the complete one
            os.replace(target, old)
        os.replace(tmp, target)
        if not keep_old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        e.filename = e.filename or str(target)
        raise
    except Exception as e:  # safetensors and torch.save report a full disk as their own exception types
        fault = file_system_fault(e, target)
        if fault is None:
            raise
        raise fault from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


FAULTS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO)


def file_system_fault(e: BaseException, where) -> OSError | None:
    """`e` as the OSError it reports (disk full, read-only, permission denied, quota, I/O), naming `where` when it
    names no file itself; None when it is no file-system fault. Libraries that write files (safetensors, torch.save)
    raise their own exception types with the system's message inside."""
    for reason in FAULTS:
        if isinstance(e, OSError) and e.errno == reason:
            e.filename = e.filename or str(where)
            return e
        if os.strerror(reason) in str(e):
            return OSError(reason, os.strerror(reason), str(where))
    return None


def old_copy(target: Path) -> Path:
    """Where `replaced_folder` keeps the previous copy of `target` (`<name>.old`)."""
    return Path(target).with_name(Path(target).name + ".old")


def remove_temporaries(target: Path) -> None:
    """Temporary folders a killed writer of `target` left behind (`.<name>.XXXX`, made by `replaced_folder`)."""
    for stale in Path(target).parent.glob(f".{Path(target).name}.*"):
        if stale.is_dir() and stale.name != f".{Path(target).name}.old":
            shutil.rmtree(stale, ignore_errors=True)
