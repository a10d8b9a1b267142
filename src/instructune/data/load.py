"""Reading records from files, `datasets` folders and hub ids, each record remembering where it came from.

Every way a file can be bad (not UTF-8, corrupt, nested too deep, unreadable) ends in an InstructuneError naming the
file and, where there is one, the line: a data file is the user's input, never a reason for a traceback."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..errors import InstructuneError
from ..hub import looks_like_hub_id
from .conll import read_conll, records_from_tokens, tag_names_from_features
from .record import Record

# Deeper than any real record; a cap keeps a hostile file from exhausting the stack of every later recursive walk.
MAX_JSON_DEPTH = 64


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".conll")


def load_records(source: str, hub_split: str = "train") -> list[Record]:
    """Records from a JSONL/JSON/CSV/Parquet/CoNLL file, a `save_to_disk` folder, or (online) a hub dataset id.
    NER rows given as `tokens` + BIO `ner_tags` become `text` + `entities` (see `conll.bio_to_entities`)."""
    path = Path(source).expanduser()
    try:
        records = _load(path, source, hub_split)
    except OSError as e:  # permission denied, a symlink loop, a folder named like a file, an I/O error
        raise InstructuneError(f"cannot read: {e.strerror or e}", str(e.filename or path)) from None
    if not records:
        raise InstructuneError("no records found", str(path))
    if "tokens" in records[0].data and "ner_tags" in records[0].data and "entities" not in records[0].data:
        records = records_from_tokens(records)  # token-tagged NER rows (tag names; ids were named where read)
    return records


def _load(path: Path, source: str, hub_split: str) -> list[Record]:
    if path.is_symlink() and not path.exists():
        raise InstructuneError("broken symbolic link or symlink loop", str(path))
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet, ".conll": read_conll}
        if suffix not in readers:
            raise InstructuneError(f"unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}", str(path))
        return readers[suffix](path)
    if path.is_dir():
        if path.suffix.lower() in SUFFIXES:
            raise InstructuneError(f"is a folder, expected a {path.suffix} file", str(path))
        return _datasets_folder(path, hub_split)
    if path.exists():
        raise InstructuneError("neither a file nor a folder", str(path))
    if looks_like_hub_id(source):
        return _hub(source, hub_split)
    raise InstructuneError("data file or folder not found", str(path))


def _decode(raw: bytes, path: Path, first_line: int = 1, line_offset: int = 0) -> str:
    """UTF-8 text (a leading byte-order mark dropped); a bad byte is named by line and byte offset in the file."""
    try:
        return raw.decode("utf-8-sig" if line_offset == 0 else "utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise InstructuneError(f"not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {line_offset + e.start} of the "
                               "file; save it as UTF-8", f"{path}:{line}") from None


class _Json:
    """A JSON decoder that refuses NaN/Infinity (not JSON) and nesting deeper than MAX_JSON_DEPTH, and records the
    keys an object gives twice. One per file: building a decoder per line would cost more than the parse."""

    def __init__(self):
        self.duplicates: list[str] = []
        self.where = ""
        self.decoder = json.JSONDecoder(object_pairs_hook=self._pairs, parse_constant=self._constant)

    def _pairs(self, items):
        obj = dict(items)
        if len(obj) != len(items):
            seen: set = set()
            self.duplicates.extend(k for k, _ in items if k in seen or seen.add(k))
        return obj

    def _constant(self, name):
        raise InstructuneError(f"{name} is not a JSON value; write null or a number", self.where)

    def loads(self, text: str, where: str) -> Any:
        """The value of `text`; self.duplicates then lists the keys it gave twice."""
        self.where, self.duplicates = where, []
        try:
            obj = self.decoder.decode(text)
        except json.JSONDecodeError as e:
            raise InstructuneError(f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})", where) from None
        except RecursionError:
            raise InstructuneError(f"JSON nested deeper than the limit of {MAX_JSON_DEPTH} levels", where) from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise InstructuneError(f"malformed JSON ({e})", where) from None
        # fewer brackets than the limit cannot nest deeper than it: the walk is needed only for the rare rest
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(obj, MAX_JSON_DEPTH):
            raise InstructuneError(f"JSON nested deeper than the limit of {MAX_JSON_DEPTH} levels", where)
        return obj


def _deeper_than(obj: Any, limit: int) -> bool:
    """Whether `obj` nests more than `limit` containers (stops descending at the limit, so never recurses further)."""
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, list):
        return False
    if limit == 0:
        return True
    return any(_deeper_than(v, limit - 1) for v in obj if isinstance(v, (dict, list)))


def _jsonl(path: Path) -> list[Record]:
    records = []
    offset = 0
    decoder = _Json()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, lineno, offset)
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            obj = decoder.loads(line, where)
            if not isinstance(obj, dict):
                raise InstructuneError(f"expected a JSON object, got {_json_type(obj)}; one object per line", where)
            records.append(Record(obj, where, {"duplicate_keys": decoder.duplicates} if decoder.duplicates else {}))
    return records


def _json(path: Path) -> list[Record]:
    decoder = _Json()
    obj = decoder.loads(_decode(path.read_bytes(), path), str(path))
    duplicates = decoder.duplicates
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list):
        raise InstructuneError(f"expected a JSON list of objects (or JSONL, one object per line), got {_json_type(obj)}",
                               str(path))
    for i, o in enumerate(obj):
        if not isinstance(o, dict):
            raise InstructuneError(f"expected a JSON object, got {_json_type(o)}", f"{path}[{i}]")
    # duplicate keys are known for the whole file only: the first record carries them for lint
    return [Record(o, f"{path}[{i}]", {"duplicate_keys": duplicates} if duplicates and i == 0 else {})
            for i, o in enumerate(obj)]


def _json_type(obj: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(obj), "a number")


def _csv(path: Path) -> list[Record]:
    text = _decode(path.read_bytes(), path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        names = reader.fieldnames or []
        if len(set(names)) != len(names):
            raise InstructuneError(f"the header names a column twice: {names}", f"{path}:1")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            n = len(names)
            if None in row:
                raise InstructuneError(f"more values than the {n} header columns", where)
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise InstructuneError(f"fewer values than the {n} header columns: no value for {missing}", where)
            records.append(Record(dict(row), where))
    except csv.Error as e:  # a NUL byte, a field over csv's size limit, an unterminated quote
        raise InstructuneError(f"malformed CSV ({e})", f"{path}:{reader.line_num}") from None
    return records


def _parquet(path: Path) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, ValueError) as e:  # not Parquet, truncated, a corrupt page
        raise InstructuneError(f"not a readable Parquet file ({e})", str(path)) from None
    return [Record(r, f"{path}[row {i}]") for i, r in enumerate(rows)]


def _datasets_folder(path: Path, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise InstructuneError("folder is not a Hugging Face `datasets` folder (save_to_disk)", str(path)) from None
    except Exception as e:  # corrupt arrow files or state.json: the folder is the user's input
        raise InstructuneError(f"not a readable `datasets` folder ({type(e).__name__}: {e})", str(path)) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InstructuneError(f"no split {split!r}; the folder has {list(ds)}", str(path))
        ds = ds[split]
    return _named_tags([Record(dict(r), f"{path}[{split} {i}]") for i, r in enumerate(ds)], ds)


def _hub(source: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, no such dataset, no such split: all are the user's input
        raise InstructuneError(f"could not load hub dataset split {split!r}: {e}", source) from None
    return _named_tags([Record(dict(r), f"{source}[{split} {i}]") for i, r in enumerate(ds)], ds)


def _named_tags(records: list[Record], ds) -> list[Record]:
    """NER rows of a `datasets` table with integer `ner_tags`: ids named by the column's ClassLabel feature."""
    if records and {"tokens", "ner_tags"} <= set(ds.column_names) and "entities" not in ds.column_names:
        return records_from_tokens(records, tag_names_from_features(ds))
    return records
