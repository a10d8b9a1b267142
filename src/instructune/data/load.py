"""Reading records from files, `datasets` folders and hub ids, each record remembering where it came from."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InstructuneError


@dataclass
class Record:
    """One labeled example as read, plus its location (`file.jsonl:12`) for error messages."""

    data: dict[str, Any]
    where: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def load_records(source: str, hub_split: str = "train") -> list[Record]:
    """Records from a JSONL/JSON/CSV/Parquet file, a `save_to_disk` folder, or (online) a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _jsonl(path)
        elif suffix == ".json":
            records = _json(path)
        elif suffix == ".csv":
            records = _csv(path)
        elif suffix == ".parquet":
            records = _parquet(path)
        else:
            raise InstructuneError(f"unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}", str(path))
    elif path.is_dir():
        records = _datasets_folder(path, hub_split)
    elif _looks_like_hub_id(source):
        records = _hub(source, hub_split)
    else:
        raise InstructuneError("data file or folder not found", str(path))
    if not records:
        raise InstructuneError("no records found", str(path))
    return records


def _jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InstructuneError(f"malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line", f"{path}:{lineno}") from None
            if not isinstance(obj, dict):
                raise InstructuneError(f"expected a JSON object, got {type(obj).__name__}", f"{path}:{lineno}")
            records.append(Record(obj, f"{path}:{lineno}"))
    return records


def _json(path: Path) -> list[Record]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InstructuneError(f"malformed JSON ({e.msg})", f"{path}:{e.lineno}") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise InstructuneError("expected a JSON list of objects (or JSONL, one object per line)", str(path))
    return [Record(o, f"{path}[{i}]") for i, o in enumerate(obj)]


def _csv(path: Path) -> list[Record]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        records = []
        for row in reader:
            if None in row:
                raise InstructuneError(f"more values than the {len(reader.fieldnames)} header columns", f"{path}:{reader.line_num}")
            records.append(Record(dict(row), f"{path}:{reader.line_num}"))
    return records


def _parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [Record(r, f"{path}[row {i}]") for i, r in enumerate(rows)]


def _datasets_folder(path: Path, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise InstructuneError("folder is not a Hugging Face `datasets` folder (save_to_disk)", str(path)) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InstructuneError(f"no split {split!r}; the folder has {list(ds)}", str(path))
        ds = ds[split]
    return [Record(dict(r), f"{path}[{split} {i}]") for i, r in enumerate(ds)]


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def _hub(source: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, no such dataset, no such split: all are the user's input
        raise InstructuneError(f"could not load hub dataset split {split!r}: {e}", source) from None
    return [Record(dict(r), f"{source}[{split} {i}]") for i, r in enumerate(ds)]
