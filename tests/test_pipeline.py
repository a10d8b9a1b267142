"""Each templated task type end to end on a tiny random model: baseline → train → evaluate → report → generate."""

import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from instructune.cli import app
from instructune.evaluate.metrics import PRIMARY_METRIC, compute_metrics

TYPES = ["classification", "summarization", "translation", "qa", "ner"]


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def answer(*args):
    """What `instructune generate` prints on stdout (progress bars go to stderr), less echo's newline."""
    result = CliRunner().invoke(app, ["generate", *(str(a) for a in args)])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def _variants(run, name):
    """Every scored variant of a task as the stages wrote it: {variant: {"metrics", "predictions", ...}}."""
    base = json.loads((run / "baseline.json").read_text()).get(name, {})
    tuned = json.loads((run / "finetuned.json").read_text())[name]
    return {v: r for v, r in {**base, **tuned}.items() if isinstance(r, dict) and "predictions" in r}


def check_results(run, name, task_type):
    """results.json and report.md against the stage outputs: each metric recomputed from the saved predictions, the
    best base variant the argmax, the change 100 × (fine-tuned − best base), and the report's row showing them."""
    task = json.loads((run / "results.json").read_text())["tasks"][name]
    choices = json.loads((run / "model" / "instructune.json").read_text())["tasks"][name].get("choices")
    variants = _variants(run, name)
    assert set(task["results"]) == set(variants)
    for v, r in variants.items():
        preds, refs = [p["prediction"] for p in r["predictions"]], [p["reference"] for p in r["predictions"]]
        assert task["results"][v] == pytest.approx(compute_metrics(task_type, preds, refs, choices)[0]), v
    primary, res = task["primary_metric"], task["results"]
    assert primary == PRIMARY_METRIC[task_type]
    bases = [v for v in res if v.startswith("base_")]
    assert task["best_base"] == max(bases, key=lambda v: res[v][primary])  # the first of equals, as max() picks
    best, tuned = res[task["best_base"]], res["finetuned"]
    for m, c in task["change_vs_best_base"].items():
        assert c["points"] == pytest.approx(100 * (tuned[m] - best[m]), abs=1e-4), m
    assert set(task["change_vs_best_base"]) == set(tuned)
    # the report's table: one column per variant, then the change against the best base variant
    lines = (run / "report.md").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| metric |") and
              any(f"| {primary} (primary) |" in later for later in lines[i:i + 8]))
    header = [c.strip() for c in lines[at].strip("|").split("|")]
    row = next(line for line in lines[at:] if line.startswith(f"| {primary} (primary) |"))
    cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))
    for v in res:
        assert cells[v.replace("_", " ")] == f"{res[v][primary]:.4f}", v
    change = next(cells[h] for h in header if h.startswith("change vs best base"))
    assert change.split()[0] == f"{task['change_vs_best_base'][primary]['points']:+.2f}"
    return task


@pytest.mark.parametrize("task_type", TYPES)
def test_task_type_end_to_end(tmp_path, tiny_model, task_type):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, (task_type,)))
    cli("run", config)
    run = tmp_path / "run"
    task = check_results(run, f"tiny_{task_type}", task_type)
    assert {"base_0shot", "base_1shot", "base_2shot", "finetuned"} <= set(task["results"])
    tuned = _variants(run, f"tiny_{task_type}")["finetuned"]["predictions"]
    assert task["n_test"] == 6 == len(tuned)  # 22 records: 12 train, 4 validation, 6 test
    assert [(s["reference"], s["finetuned"]) for s in task["samples"]] == \
        [(p["reference"], p["prediction"]) for p in tuned[:3]]  # evaluate.samples: 3 by default
    assert (run / "report.md").read_text().count("| metric |") == 1
    # the model folder loads with the template it was trained with
    manifest = json.loads((run / "model" / "instructune.json").read_text())
    assert manifest["version"] == 1 and manifest["tasks"][f"tiny_{task_type}"]["type"] == task_type
    assert (run / "model" / "adapter_model.safetensors").is_file()
    assert manifest["audit"]["eos_supervised"] is True


def test_stages_one_at_a_time_and_generate(tmp_path, tiny_model):
    # Full fine-tuning at a high learning rate: in 12 steps the tiny model learns enough French for a chrF above 0.
    cfg = tiny_config(tmp_path, tiny_model, ("translation", "qa"), method="full", lr=0.01, epochs=4)
    config = write_config(tmp_path, cfg)
    run = tmp_path / "run"
    cli("baseline", config)
    assert (run / "baseline.json").is_file() and not (run / "finetuned.json").exists()
    cli("train", config)
    assert (run / "model" / "model.safetensors").is_file()
    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 24 and sum(losses[-4:]) < 0.8 * sum(losses[:4])  # it learns
    cli("evaluate", config)
    out = cli("report", config)
    task = check_results(run, "tiny_translation", "translation")
    check_results(run, "tiny_qa", "qa")
    assert task["results"]["finetuned"]["chrf"] > 0.01 > max(task["results"][v]["chrf"] for v in task["results"]
                                                            if v.startswith("base_"))
    points = task["change_vs_best_base"]["chrf"]["points"]
    assert f"tiny_translation: chrf fine-tuned {task['results']['finetuned']['chrf']:.4f}" in out
    assert f"{points:+.2f} points" in out
    results = json.loads((run / "results.json").read_text())
    assert results["model"]["method"] == "full" and results["training"]["steps"] == 24
    # generate renders the saved template and answers a test input exactly as the evaluation did
    tuned = json.loads((run / "finetuned.json").read_text())
    first = json.loads((tmp_path / "data" / "translation" / "test.jsonl").read_text().splitlines()[0])
    said = answer("--model", run, "--task", "tiny_translation", first["text"])
    assert tuned["tiny_translation"]["finetuned"]["predictions"][0]["reference"] == first["translation"]
    # the evaluation stores the answer stripped (clean_generation); generate prints the raw text
    assert said.strip() == tuned["tiny_translation"]["finetuned"]["predictions"][0]["prediction"]
    qa = json.loads((tmp_path / "data" / "qa" / "test.jsonl").read_text().splitlines()[0])
    said = answer("--model", run, "--task", "tiny_qa", json.dumps(qa))
    assert said.strip() == tuned["tiny_qa"]["finetuned"]["predictions"][0]["prediction"]
    bad = CliRunner().invoke(app, ["generate", "--model", str(run), "hello"])
    assert bad.exit_code == 2 and "--task" in bad.output


def test_plain_model_without_chat_template(tmp_path, tiny_plain_model):
    cfg = tiny_config(tmp_path, tiny_plain_model, ("translation",))
    cli("run", write_config(tmp_path, cfg))
    manifest = json.loads((tmp_path / "run" / "model" / "instructune.json").read_text())
    assert manifest["chat_template"] is False


def test_data_preview_shows_trained_tokens(tmp_path, tiny_model):
    out = cli("data", "preview", write_config(tmp_path, tiny_config(tmp_path, tiny_model, ("ner",))))
    assert "supervised tokens" in out and "Maria" in out
    assert not (tmp_path / "run").exists()  # preview writes nothing


def test_templates_listing():
    out = cli("templates", "qa")
    assert "qa/read-answer" in out and "classification/" not in out


def test_t5_trains_and_evaluates_through_the_same_commands(tmp_path, tiny_t5):
    """An encoder-decoder model: prompt to the encoder, completion (and EOS) to the decoder, same protocol."""
    cfg = tiny_config(tmp_path, tiny_t5, ("classification", "summarization"), epochs=2, lr=5e-3)
    cli("run", write_config(tmp_path, cfg))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["tasks"]) == {"tiny_classification", "tiny_summarization"}
    check_results(tmp_path / "run", "tiny_classification", "classification")
    check_results(tmp_path / "run", "tiny_summarization", "summarization")
    manifest = json.loads((tmp_path / "run" / "model" / "instructune.json").read_text())
    assert manifest["encoder_decoder"] is True and manifest["audit"]["eos_supervised"] is True
    adapter = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]  # it learns
    cli("generate", "--model", tmp_path / "run", "--task", "tiny_classification", "my parcel is late")
    # evaluate must see the settings the model was trained with (the run folder refuses a changed config)
    full = ("--set", "train.method=full", "--set", "train.epochs=1")
    cli("train", write_config(tmp_path, cfg), *full)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    cli("evaluate", write_config(tmp_path, cfg), *full)
    assert json.loads((tmp_path / "run" / "finetuned.json").read_text())["tiny_classification"]["finetuned"]["metrics"]
