"""The base model's best prompt is chosen on the validation split, never on the test split."""

from __future__ import annotations

import re

import pytest

from instructune.config import EvalConfig, ModelConfig, TaskConfig
from instructune.data import Record
from instructune.errors import InstructuneError
from instructune.evaluate import best_prompt as bp
from instructune.models import load_tokenizer
from instructune.prompts import PromptFormat, build_task_template

LABELS = ["billing", "delivery"]


def records(split: str, n: int) -> list[Record]:
    return [Record({"text": f"{split} message {i}", "label": LABELS[i % 2]}, f"{split}.jsonl:{i + 1}") for i in range(n)]


@pytest.fixture
def setup(tiny_model):
    task = TaskConfig(name="t", type="classification", data={"path": "x.jsonl"}, choices=LABELS)
    template = build_task_template(task, "raw", 8)
    fmt = PromptFormat(load_tokenizer(str(tiny_model), ModelConfig(name=str(tiny_model))), True, template.separator)
    return template, fmt, {"train": records("train", 6), "validation": records("validation", 4), "test": records("test", 4)}


def fake_answer(winner_on_validation: str, winner_on_test: str):
    """Answers right only for one template on the validation split and only for another on the test split."""
    def answer(model, fmt, template, prompts, cfg, desc):
        name = next(n for n, t in bp.LIBRARY.items() if t == template.template)
        out = []
        for p in prompts:
            split, i = re.findall(r"(train|validation|test) message (\d+)", p)[-1]  # the record asked about
            right = LABELS[int(i) % 2]
            good = name == (winner_on_validation if split == "validation" else winner_on_test)
            out.append(right if good else LABELS[(int(i) + 1) % 2])
        return out, "generation"
    return answer


def test_the_choice_is_made_on_validation_not_on_test(setup, monkeypatch):
    template, fmt, recs = setup
    monkeypatch.setattr(bp, "answer", fake_answer("classification/predict", "classification/question"))
    options = bp.candidates(template, "all", "baseline.templates")
    assert [n for n, _ in options] == [n for n in bp.LIBRARY if n.startswith("classification/")]
    result = bp.best_prompt(None, fmt, options, recs, [0], 0, 2048, EvalConfig(), "t")
    assert result["choice"]["template"] == "classification/predict"  # the validation winner ...
    assert result["choice"]["validation"] == 1.0
    assert result["metrics"]["accuracy"] == 0.0  # ... even though another phrasing would have won on test
    assert len(result["choice"]["tried"]) == len(options)


def test_unknown_or_foreign_templates_are_refused(setup):
    template, _, _ = setup
    with pytest.raises(InstructuneError, match="unknown classification template"):
        bp.candidates(template, ["qa/read-answer"], "baseline.templates")


def test_a_validation_split_is_required(setup):
    template, fmt, recs = setup
    with pytest.raises(InstructuneError, match="validation split"):
        bp.best_prompt(None, fmt, bp.candidates(template, "all", "k"), {**recs, "validation": []}, [0], 0, 2048,
                       EvalConfig(), "t")


def test_a_run_with_every_phrasing_reports_the_best_prompt_chosen_on_validation(tmp_path, tiny_model):
    import json

    from typer.testing import CliRunner

    from conftest import tiny_config, write_config
    from instructune.cli import app

    cfg = tiny_config(tmp_path, tiny_model, ("classification",))
    cfg["baseline"] = {"k": 2, "templates": ["classification/choices", "classification/question"]}
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 0, result.output
    base = json.loads((tmp_path / "run" / "baseline.json").read_text())["tiny_classification"]
    choice = base["base_best_prompt"]["choice"]
    assert len(choice["tried"]) == 2 * 3  # two phrasings x 0/1/2 shots, all on validation
    best = max(choice["tried"], key=lambda t: t["validation"])
    assert (choice["template"], choice["shots"]) == (best["template"], best["shots"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())["tasks"]["tiny_classification"]
    assert "base_best_prompt" in results["results"] and "base_best_prompt" in results["change"]
    assert "ci_low" in results["change"]["base_best_prompt"]["accuracy"]
