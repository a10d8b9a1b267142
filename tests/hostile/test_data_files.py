"""Hostile data files: bad encodings, corrupt CSV/Parquet/JSON, hostile nesting, unreadable paths. Each ends in one
line naming the file (and line), exit 2, no traceback, nothing written, the files untouched."""

from __future__ import annotations

import os

import pytest

from hostile_helpers import accepted, refused, rows_of, tiny_config, write_jsonl
from instructune.data.load import MAX_JSON_DEPTH, load_records


def _train(cfg) -> str:
    return cfg["tasks"][0]["data"]["train"]


def _train_line(cfg, index: int, text: str) -> str:
    """The training file with its line `index` (0-based) replaced by `text`; returns the file's path."""
    lines = open(_train(cfg)).read().splitlines(keepends=True)
    lines[index] = text
    open(_train(cfg), "w").write("".join(lines))
    return _train(cfg)


def _replace_train(cfg, tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / "data" / name
    path.write_bytes(content)
    cfg["tasks"][0]["data"]["train"] = str(path)
    return str(path)


def _csv_bytes(cfg) -> bytes:
    rows = rows_of(_train(cfg))
    return ("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)).encode()


def test_a_non_utf8_byte_in_jsonl_names_line_and_byte_offset(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    lines = open(_train(cfg), "rb").read().splitlines(keepends=True)
    offset = sum(len(line) for line in lines[:2]) + 10
    lines[2] = lines[2][:10] + b"\xff" + lines[2][11:]
    open(_train(cfg), "wb").write(b"".join(lines))
    refused(tmp_path, cfg, f"{_train(cfg)}:3", "not UTF-8", "0xff", f"byte offset {offset}")


def test_a_non_utf8_byte_in_csv_names_its_line(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    data = _csv_bytes(cfg).replace(b"parcel", b"parc\xe9l", 1)  # Latin-1, not UTF-8
    line = data[:data.index(b"\xe9")].count(b"\n") + 1
    path = _replace_train(cfg, tmp_path, "train.csv", data)
    refused(tmp_path, cfg, f"{path}:{line}", "not UTF-8", "0xe9")


def test_garbage_with_a_parquet_name_is_named(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    path = _replace_train(cfg, tmp_path, "train.parquet", b"this is not parquet at all\n" * 10)
    refused(tmp_path, cfg, path, "not a readable Parquet file")


def test_a_truncated_parquet_file_is_named(tmp_path, tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = tiny_config(tmp_path, tiny_model)
    path = tmp_path / "data" / "full.parquet"
    pq.write_table(pa.Table.from_pylist(rows_of(_train(cfg))), path)
    cut = _replace_train(cfg, tmp_path, "train.parquet", path.read_bytes()[:-40])
    refused(tmp_path, cfg, cut, "not a readable Parquet file")


def test_a_csv_row_missing_a_column_names_its_line(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    lines = _csv_bytes(cfg).splitlines(keepends=True)
    lines[4] = b"a row with no label column\n"
    path = _replace_train(cfg, tmp_path, "train.csv", b"".join(lines))
    refused(tmp_path, cfg, f"{path}:5", "fewer values than the 2 header columns", "label")


def test_a_csv_row_with_an_extra_column_names_its_line(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    lines = _csv_bytes(cfg).splitlines(keepends=True)
    lines[3] = b"one,two,three\n"
    path = _replace_train(cfg, tmp_path, "train.csv", b"".join(lines))
    refused(tmp_path, cfg, f"{path}:4", "more values than the 2 header columns")


def test_a_csv_field_over_the_csv_size_limit_is_named(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    lines = _csv_bytes(cfg).splitlines(keepends=True)
    lines[2] = b'"' + b"x" * 200_000 + b'",billing\n'
    path = _replace_train(cfg, tmp_path, "train.csv", b"".join(lines))
    refused(tmp_path, cfg, f"{path}:", "malformed CSV", "field larger than field limit")


def test_a_csv_header_naming_a_column_twice(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    data = _csv_bytes(cfg).replace(b"text,label", b"text,text", 1)
    path = _replace_train(cfg, tmp_path, "train.csv", data)
    refused(tmp_path, cfg, f"{path}:1", "names a column twice")


def test_malformed_json_file_is_named(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    path = _replace_train(cfg, tmp_path, "train.json", b'[{"text": "a", "label": "b"},\n {"text": ')
    refused(tmp_path, cfg, path, "malformed JSON", "line 2")


def test_jsonl_nested_100000_deep_names_the_line(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    _train_line(cfg, 5, '{"text": "x", "label": "billing", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    refused(tmp_path, cfg, f"{_train(cfg)}:6", f"nested deeper than the limit of {MAX_JSON_DEPTH}")


def test_jsonl_nested_past_the_limit_but_parseable_names_the_line(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    _train_line(cfg, 1, '{"text": "x", "label": "billing", "deep": ' + '{"a": ' * 70 + "1" + "}" * 70 + "}\n")
    refused(tmp_path, cfg, f"{_train(cfg)}:2", "nested deeper than the limit")


def test_a_json_file_nested_100000_deep_is_named(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    path = _replace_train(cfg, tmp_path, "train.json", b"[" * 100_000 + b"]" * 100_000)
    refused(tmp_path, cfg, path, "nested deeper than the limit")


def test_a_jsonl_line_that_is_a_list_not_an_object(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    _train_line(cfg, 3, '["text", "label"]\n')
    refused(tmp_path, cfg, f"{_train(cfg)}:4", "expected a JSON object, got a list")


def test_nan_in_jsonl_is_not_json(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    _train_line(cfg, 7, '{"text": "x", "label": NaN}\n')
    refused(tmp_path, cfg, f"{_train(cfg)}:8", "NaN is not a JSON value")


def test_an_integer_of_5000_digits_is_malformed_json_not_a_traceback(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    _train_line(cfg, 0, '{"text": "x", "label": ' + "9" * 5000 + "}\n")
    refused(tmp_path, cfg, f"{_train(cfg)}:1", "malformed JSON")


def test_a_symlink_loop_is_named(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    loop = tmp_path / "data" / "loop.jsonl"
    os.symlink(loop, loop)
    cfg["tasks"][0]["data"]["train"] = str(loop)
    refused(tmp_path, cfg, str(loop), "symlink loop")


def test_a_folder_where_a_file_is_expected_is_named(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    folder = tmp_path / "data" / "folder.jsonl"
    folder.mkdir()
    cfg["tasks"][0]["data"]["train"] = str(folder)
    refused(tmp_path, cfg, str(folder), "is a folder, expected a .jsonl file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_named(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    os.chmod(_train(cfg), 0)
    try:
        refused(tmp_path, cfg, _train(cfg), "cannot read", "Permission denied")
    finally:
        os.chmod(_train(cfg), 0o644)


def test_an_empty_data_file_is_named(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    open(_train(cfg), "w").close()
    refused(tmp_path, cfg, _train(cfg), "no records found")


def test_duplicate_json_keys_are_recorded_not_fatal(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    _train_line(cfg, 2, '{"text": "the app crashes", "label": "billing", "label": "technical"}\n')
    records = load_records(_train(cfg))
    assert records[2].data["label"] == "technical" and records[2].meta == {"duplicate_keys": ["label"]}
    assert all(not r.meta for i, r in enumerate(records) if i != 2)
    accepted(tmp_path, cfg)


def test_a_utf8_byte_order_mark_is_fine(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    data = open(_train(cfg), "rb").read()
    open(_train(cfg), "wb").write(b"\xef\xbb\xbf" + data)
    assert load_records(_train(cfg))[0].data == rows_of_bytes(data)[0]


def rows_of_bytes(data: bytes) -> list[dict]:
    import json

    return [json.loads(line) for line in data.decode().splitlines()]


def test_a_given_split_file_written_back_unchanged(tmp_path, tiny_model):
    # reading never rewrites: the bytes of a bad file are the same afterwards (refused() checks every file)
    cfg = tiny_config(tmp_path, tiny_model)
    rows = rows_of(_train(cfg))
    rows[1]["label"] = None
    write_jsonl(_train(cfg), rows)
    refused(tmp_path, cfg, f"{_train(cfg)}:2", "field 'label' is null", command=("run",))
