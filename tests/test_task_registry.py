"""The task-type registry: a sixth type defined here, in the test, runs end to end (prepare → baseline → train →
evaluate → report) without touching any module; an unknown type is refused, naming the known ones."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, write_config, write_jsonl
from instructune import tasktypes
from instructune.cli import app
from instructune.config import load_config
from instructune.data.lint import lint_pairs
from instructune.errors import InstructuneError
from instructune.evaluate.classical import METHODS
from instructune.evaluate.metrics import METRIC_SETS, MetricSet, compute_metrics, metric_statistics
from instructune.prompts.library import LIBRARY, Template
from instructune.prompts.template import Pair

# --- the toy type: find the order number an e-mail mentions -----------------------------------------------------

EXTRACTION = tasktypes.TaskType(
    "extraction", inputs=("email",), answer="order", metrics="order_match", primary_metric="exact",
    default_template="extraction/order", max_new_tokens=8, classical="first_number",
    lint=("empty_input",))  # the answer is in the prompt by design
ORDER_TEMPLATE = Template("Which order number does this e-mail mention?\n\n{{ email }}", "{{ order }}", "\nOrder: ")


def _order_scores(predictions, references) -> dict[str, list[float]]:
    return {"exact": [float(p.strip() == r.strip()) for p, r in zip(predictions, references)],
            "has_digit": [float(any(c.isdigit() for c in p)) for p in predictions]}


ORDER_METRICS = MetricSet(_order_scores, lambda: {"exact": "stripped string equality, mean over examples",
                                                  "has_digit": "share of answers with a digit"})


def first_number(ttype, train, validation, test, seed):
    """The first run of digits in the e-mail (nothing is fitted)."""
    preds = [(re.findall(r"\d+", str(e[ttype.inputs[0]])) or [""])[0] for e in test]
    return preds, {"method": "first number", "params": {}}


@contextmanager
def registered_extraction():
    """The type, its template, its metric set and its classical baseline, each in its own table; all undone after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(LIBRARY, "extraction/order", ORDER_TEMPLATE)
        mp.setitem(METRIC_SETS, "order_match", ORDER_METRICS)
        mp.setitem(METHODS, "first_number", first_number)
        tasktypes.register(EXTRACTION)
        try:
            yield EXTRACTION
        finally:
            tasktypes.unregister("extraction")


@pytest.fixture
def extraction():
    with registered_extraction() as ttype:
        yield ttype


def order_record(i: int) -> dict:
    names = ["Maria", "Jonas", "Aiko", "Pedro"]
    return {"email": f"Hello, this is {names[i % 4]}. My order {4100 + 7 * i} has not arrived yet.",
            "order": str(4100 + 7 * i)}


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


# --- the tests ------------------------------------------------------------------------------------------------------

def test_a_registered_type_runs_end_to_end(tmp_path, tiny_model, extraction):
    rows = [order_record(i) for i in range(22)]
    base = tmp_path / "data" / "extraction"
    cfg = tiny_config(tmp_path, tiny_model, ())
    cfg["tasks"] = [{"name": "orders", "type": "extraction", "data": {
        "train": str(write_jsonl(base / "train.jsonl", rows[:12])),
        "validation": str(write_jsonl(base / "validation.jsonl", rows[12:16])),
        "test": str(write_jsonl(base / "test.jsonl", rows[16:]))}}]
    cli("run", write_config(tmp_path, cfg))

    run = tmp_path / "run"
    task = json.loads((run / "results.json").read_text())["tasks"]["orders"]
    assert task["type"] == "extraction" and task["primary_metric"] == "exact"
    assert {"base_0shot", "base_1shot", "base_2shot", "classical", "finetuned"} <= set(task["results"])
    assert task["classical"]["method"] == "first number" and task["results"]["classical"]["exact"] == 1.0
    base_json = json.loads((run / "baseline.json").read_text())["orders"]
    tuned_json = json.loads((run / "finetuned.json").read_text())["orders"]
    for variant, result in {**base_json, **tuned_json}.items():
        if not isinstance(result, dict) or "predictions" not in result:
            continue
        preds = [p["prediction"] for p in result["predictions"]]
        refs = [p["reference"] for p in result["predictions"]]
        assert refs == [r["order"] for r in rows[16:]]
        assert task["results"][variant] == pytest.approx(compute_metrics("extraction", preds, refs)[0]), variant
        assert result["signatures"]["exact"] == "stripped string equality, mean over examples"
    assert set(task["change_vs_best_base"]) == {"exact", "has_digit"}  # paired bootstrap over the mean scores
    # the model folder carries the type's template (the library's default for it) and its generation budget
    saved = json.loads((run / "model" / "instructune.json").read_text())["tasks"]["orders"]
    assert saved["type"] == "extraction" and saved["template"]["prompt"] == ORDER_TEMPLATE.prompt
    assert saved["max_new_tokens"] == 8
    assert "| exact (primary) |" in (run / "report.md").read_text()
    assert "extraction/order (default)" in cli("templates", "extraction")


def test_a_registered_type_has_its_own_checks_and_statistics(extraction):
    record = {"email": " ", "order": "4100"}
    pair = Pair([{"role": "user", "content": "Which order?\n\n "}], "4100", "orders.jsonl:3", record)
    [warning] = lint_pairs("extraction", {}, [pair])
    assert warning["kind"] == "empty_input" and "field 'email' is empty" in warning["examples"][0]["text"]
    stats = metric_statistics("extraction", ["4100", "x"], ["4100", "4107"])
    assert {k: float(finish(s.sum(0, keepdims=True))[0]) for k, (s, finish) in stats.items()} == \
        compute_metrics("extraction", ["4100", "x"], ["4100", "4107"])[0] == {"exact": 0.5, "has_digit": 0.5}


def test_registration_is_undone():
    with registered_extraction():
        assert "extraction" in tasktypes.names() and "extraction/order" in LIBRARY
        with pytest.raises(ValueError, match="registered already"):
            tasktypes.register(EXTRACTION)
    assert tasktypes.names() == tasktypes.BUILTIN == ("classification", "summarization", "translation", "qa", "ner")
    assert "extraction/order" not in LIBRARY and "order_match" not in METRIC_SETS and "first_number" not in METHODS


def test_an_unknown_type_is_refused_with_the_known_ones_listed(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, ("classification",))
    cfg["tasks"][0]["type"] = "extraction"
    with pytest.raises(InstructuneError) as e:
        load_config(write_config(tmp_path, cfg))
    message = str(e.value)
    assert "(tasks.0.type)" in message and "unknown task type 'extraction'" in message
    assert "classification, summarization, translation, qa, ner" in message
    with pytest.raises(InstructuneError, match="known task types: classification, summarization, translation, qa, ner"):
        tasktypes.get("extraction")
    with pytest.raises(ValueError, match="unknown task type"):  # the metrics refuse it as well
        compute_metrics("extraction", ["1"], ["1"])
