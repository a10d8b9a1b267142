"""MLflow tracking (`tracking: {mlflow: ...}`): a tiny experiment logged to the default local store, read back with
MLflow's own client and compared with the run folder; bad tracking settings refused before anything is written."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from instructune.cli import app

mlflow = pytest.importorskip("mlflow")


def _flat(value, prefix=""):
    if isinstance(value, (dict, list)) and value:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return {k: v for key, item in items for k, v in _flat(item, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {prefix: str(value)}


def test_a_tracked_run_reads_back_from_mlflow_as_the_run_folder_holds_it(tmp_path, tiny_model, monkeypatch):
    from mlflow.telemetry import get_telemetry_client
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # `mlflow: {}` logs to ./mlruns; a git repo here gives the commit tag
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    cfg = tiny_config(tmp_path, tiny_model, epochs=2, lr=5e-3, eval_every=1)
    cfg["baseline"] = {"k": 2, "classical": False}
    cfg["evaluate"]["bootstrap_resamples"] = 200
    cfg["tracking"] = {"mlflow": {}}
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 0, result.output
    assert get_telemetry_client() is None  # MLflow's usage telemetry stays off: nothing is sent anywhere

    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "mlflow_run.json").read_text())
    assert record["uri"] == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(record["uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params == _flat(yaml.safe_load((run_dir / "config.yaml").read_text()))  # the resolved config

    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "tokens_per_s", "val_loss"):  # every step, as train_log.jsonl has it
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(e["step"], e[key]) for e in log if key in e], key
    assert len(log) == 6 and all("val_loss" in e for e in log)
    peaks = [e["peak_gb"] for e in log]  # the process's peak so far: positive, never falling within a training
    assert peaks[0] > 0 and peaks == sorted(peaks), peaks

    results = json.loads((run_dir / "results.json").read_text())
    task = results["tasks"]["tiny_classification"]
    for variant, metrics in task["results"].items():  # every variant's final metrics
        assert run.data.metrics[f"tiny_classification.{variant}.accuracy"] == metrics["accuracy"]
    for variant, change in task["change"].items():  # and the fine-tuned model's change against it, with its CI
        for part in ("points", "ci_low", "ci_high", "p_value"):
            assert run.data.metrics[f"tiny_classification.change_vs_{variant}.accuracy.{part}"] == change["accuracy"][part]
    assert {"base_0shot", "base_1shot", "base_2shot", "finetuned"} <= set(task["results"])

    assert run.data.tags["instructune.data_fingerprint"] == results["data_fingerprint"]
    assert run.data.tags["mlflow.source.git.commit"] == commit
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"config.yaml", "data_stats.json", "train_log.jsonl", "results.json", "report.md", "report.html"}
    for name in names:
        local = client.download_artifacts(run.info.run_id, name, str(tmp_path))
        assert open(local, "rb").read() == (run_dir / name).read_bytes(), name
    assert (tmp_path / "mlruns" / "artifacts").is_dir()  # the store's artifacts beside it, nowhere else


@pytest.mark.parametrize("mlflow_cfg, key", [
    ({"uri": "mlruns"}, "tracking.mlflow.uri"),  # a folder, not a URI
    ({"uri": "nosuchscheme://x"}, "tracking.mlflow.uri"),
    ({"experiment": ""}, "tracking.mlflow.experiment"),
    ({"bogus": 1}, "tracking.mlflow.bogus"),
    ("yes", "tracking.mlflow"),
])
def test_bad_tracking_settings_are_refused_before_anything_is_written(tmp_path, tiny_model, monkeypatch, mlflow_cfg, key):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tracking"] = {"mlflow": mlflow_cfg}
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 2, result.output
    assert key in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlruns").exists()
