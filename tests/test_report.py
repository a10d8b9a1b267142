"""results.json carries the statistics: CIs and p-values per change, forgetting, leakage, perplexity."""

import json

from typer.testing import CliRunner

from conftest import TASK_RECORDS, tiny_config, write_config, write_jsonl
from instructune.cli import app
from instructune.data.leakage import find_leakage, normalize


def test_leakage_finds_exact_and_near_duplicates():
    train = ["The parcel arrived late and the box was crushed.", "I was charged twice for order 123 this month.",
             "My password reset link does not work at all."]
    test = ["the parcel ARRIVED late, and the box was crushed!",            # exact after normalising
            "I was charged twice for order 123 this month, please.",   # near: 7 of 8 trigrams
            "Where is my refund for the cancelled subscription?"]           # clean
    lk = find_leakage(train, test, threshold=0.8)
    assert (lk["exact"], lk["near"], lk["test_size"]) == (1, 1, 3)
    assert [e["kind"] for e in lk["examples"]] == ["exact", "near"]
    assert find_leakage(train, test, threshold=0.9)["near"] == 0
    assert normalize("  Héllo,  WORLD! ") == "héllo world"


def test_results_have_intervals_forgetting_leakage_and_perplexity(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, ("classification",))
    held = tiny_config(tmp_path / "held", tiny_model, ("qa",))["tasks"][0]
    held["name"] = "held_out_qa"
    cfg["forgetting"] = [held]
    cfg["evaluate"]["bootstrap_resamples"] = 500
    test_file = cfg["tasks"][0]["data"]["test"]
    train_row = TASK_RECORDS["classification"](3)  # a training example copied into the test split: leakage
    rows = [json.loads(line) for line in open(test_file)] + [train_row]
    write_jsonl(test_file, rows)
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    task = results["tasks"]["tiny_classification"]
    for variant in ("base_0shot", "base_1shot", "base_2shot"):
        for metric in ("accuracy", "macro_f1"):
            c = task["change"][variant][metric]
            assert c["ci_low"] <= c["points"] / 100 + 1e-9 <= c["ci_high"] + 1e-9
            assert 0 < c["p_value"] <= 1 and isinstance(c["significant"], bool)
    assert task["change_vs_best_base"] == task["change"][task["best_base"]]
    assert len(task["token_lengths"]["prompt"]) == 12 and min(task["token_lengths"]["completion"]) >= 2
    assert "held_out_qa" not in results["tasks"]  # never trained on, so not a fine-tuning result
    forgot = results["forgetting"]["tasks"]["held_out_qa"]
    assert forgot["metric"] == "f1" and {"ci_low", "ci_high", "p_value"} <= set(forgot["change"])
    assert results["leakage"]["tiny_classification"]["exact"] == 1
    assert "leakage" in result.output or "also in the training split" in result.output
    assert results["perplexity"]["tiny_classification"]["base"] > 1
    assert results["training"]["log"][-1]["step"] == results["training"]["steps"]
    manifest = json.loads((tmp_path / "run" / "model" / "instructune.json").read_text())
    assert "held_out_qa" in manifest["held_out_tasks"] and "held_out_qa" not in manifest["tasks"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "95 % CI" in report and "Forgetting" in report and "leakage" in report
    html = (tmp_path / "run" / "report.html").read_text()
    assert "chart-loss" in html and "chart-primary" in html and "held_out_qa" in html
