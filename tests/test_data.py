"""Loading files and folders, recognising record shapes, deterministic (stratified) splits, and config loading."""

import csv
import json
from collections import Counter

import pytest

from conftest import write_jsonl
from instructune.config import load_config
from instructune.data import detect_shape, load_records, split_records
from instructune.data.load import Record
from instructune.errors import InstructuneError
from instructune.prompts import build_task_template
from instructune.config import TaskConfig

ROWS = [{"text": f"row {i}", "label": "a" if i % 3 else "b"} for i in range(30)]


def test_jsonl_csv_parquet_and_datasets_folder_read_the_same(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    for src in ("d.jsonl", "d.csv", "d.parquet", "d.json", "hf"):
        assert [r.data for r in load_records(str(tmp_path / src))] == ROWS, src
    assert load_records(str(tmp_path / "d.jsonl"))[3].where.endswith("d.jsonl:4")
    assert load_records(str(tmp_path / "d.csv"))[0].where.endswith("d.csv:2")  # line 1 is the header


def test_unsupported_file_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InstructuneError, match="unsupported file type"):
        load_records(str(tmp_path / "d.txt"))
    with pytest.raises(InstructuneError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(InstructuneError, match=r"d\.jsonl:2.*expected a JSON object"):
        load_records(str(tmp_path / "d.jsonl"))


@pytest.mark.parametrize("record,shape", [
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "messages"),
    ({"text": "t", "label": "l"}, "raw"),
])
def test_shapes(record, shape):
    assert detect_shape(record) == shape


def test_shaped_records_become_pairs_without_a_template():
    task = TaskConfig(name="t", type="summarization", data={"path": "x.jsonl"})
    alpaca = build_task_template(task, "alpaca", 64)
    p = alpaca.pair(Record({"instruction": "Summarize.", "input": "Long text.", "output": "Short."}, "a:1"))
    assert p.messages == [{"role": "user", "content": "Summarize.\n\nLong text."}] and p.completion == "Short."
    chat = build_task_template(task, "messages", 64)
    p = chat.pair(Record({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                       {"role": "assistant", "content": "A"}]}, "m:1"))
    assert [m["role"] for m in p.messages] == ["system", "user"] and p.completion == "A"
    with pytest.raises(InstructuneError, match="m:2.*end with the assistant"):
        chat.pair(Record({"messages": [{"role": "user", "content": "U"}]}, "m:2"))


def test_splits_are_deterministic_stratified_and_disjoint():
    records = [Record(r, f"d:{i}") for i, r in enumerate(ROWS)]
    a = split_records(list(records), 0.1, 0.2, seed=7, label_of=lambda r: r.data["label"])
    b = split_records(list(records), 0.1, 0.2, seed=7, label_of=lambda r: r.data["label"])
    assert {k: [r.where for r in v] for k, v in a.items()} == {k: [r.where for r in v] for k, v in b.items()}
    assert sorted(r.where for v in a.values() for r in v) == sorted(r.where for r in records)
    assert Counter(r.data["label"] for r in a["test"]) == {"a": 4, "b": 2}  # 20 a / 10 b → 20 % of each
    c = split_records(list(records), 0.1, 0.2, seed=8, label_of=lambda r: r.data["label"])
    assert [r.where for r in c["test"]] != [r.where for r in a["test"]]


def test_relative_data_paths_are_relative_to_the_config(tmp_path):
    write_jsonl(tmp_path / "sub" / "d.jsonl", ROWS)
    (tmp_path / "exp.yaml").write_text("name: x\ntasks:\n  - name: t\n    type: classification\n"
                                       "    data: {path: sub/d.jsonl}\n")
    cfg = load_config(tmp_path / "exp.yaml", ["train.epochs=3", "tasks.0.data.test_size=0.5"])
    assert cfg.tasks[0].data.path == str((tmp_path / "sub" / "d.jsonl").resolve())
    assert cfg.train.epochs == 3 and cfg.tasks[0].data.test_size == 0.5
    assert cfg.tasks[0].template is None and cfg.train.learning_rate == 1e-3
