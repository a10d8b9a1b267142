"""MLflow tracking (`tracking: {mlflow: {uri, experiment}}`): the resolved config as params, the data fingerprint and
git commit as tags, each training step's loss, learning rate, tokens per second and validation loss as metrics (as
the training log is written, beside TensorBoard), then at the report every variant's final metrics with the
bootstrap interval of the fine-tuned model's change against it, and the report and results as artifacts.

One MLflow run per training of the run folder; its id is kept in the folder (mlflow_run.json), so stage commands
run one at a time (`train`, later `report`) add to the same MLflow run. Only MLflow's client library is used, with
its usage telemetry off: nothing leaves the machine unless `uri` names a server."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from importlib.util import find_spec
from pathlib import Path

from .config import ExperimentConfig
from .errors import InstructuneError
from .io import read_json, write_json
from .runtime import is_main_process, warn

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # read by mlflow when it is imported (below, lazily) and when it sends

RECORD = "mlflow_run.json"  # in the run folder: the store and the MLflow run of the current training
WHERE = "tracking.mlflow"
STEP_KEYS = ("loss", "lr", "tokens_per_s", "val_loss", "val_metric")  # train_log.jsonl's names, as logged
ARTIFACTS = ("config.yaml", "data_stats.json", "train_log.jsonl", "results.json", "report.md", "report.html")


def check(cfg: ExperimentConfig) -> None:
    """Before the run folder is written: the MLflow client (and SQLAlchemy and Alembic for a SQLite store: the
    `mlflow` extra) is installed, and the store opens and holds (or takes) the experiment."""
    if cfg.tracking.mlflow is None:
        return
    needed = [("mlflow", "mlflow-skinny")]
    if store_uri(cfg).startswith("sqlite:"):
        needed += [("sqlalchemy", "sqlalchemy"), ("alembic", "alembic")]
    for module, package in needed:
        if find_spec(module) is None:
            raise InstructuneError(f"MLflow tracking needs {package}: pip install 'instructune[mlflow]'", WHERE)
    if is_main_process():  # the one that logs (several processes would race to create the store)
        _experiment(_client(cfg)[0], cfg)


def store_uri(cfg: ExperimentConfig) -> str:
    """The tracking URI: the config's, or a SQLite store in ./mlruns (artifacts beside it), MLflow's local layout."""
    return cfg.tracking.mlflow.uri or f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"


class Tracker:
    """The MLflow run of one training. Steps are logged without waiting (MLflow's asynchronous logging), so a slow
    store never slows training; `close` waits for them. A store that fails mid-training is warned about once and
    left alone: the run folder keeps the full log."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id, self.pending, self.failed = client, run_id, [], False

    def step(self, entry: dict) -> None:
        from mlflow.entities import Metric

        if self.failed:
            return
        metrics = [Metric(k, float(entry[k]), _now(), entry["step"]) for k in STEP_KEYS if k in entry]
        try:
            self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))
        except Exception as e:  # noqa: BLE001 (any fault of the store: training goes on)
            self._failed(e)

    def close(self) -> None:
        try:
            for operation in self.pending:
                operation.wait()
        except Exception as e:  # noqa: BLE001
            self._failed(e)
        self.pending = []

    def _failed(self, e: Exception) -> None:
        self.failed = True
        warn(f"MLflow: logging to run {self.run_id} failed ({type(e).__name__}: {str(e)[:200]}); training goes on, "
             "train_log.jsonl has every step")


@contextlib.contextmanager
def training(cfg: ExperimentConfig, run_dir: Path, fingerprint: str | None, resume: bool):
    """The per-step callback for `train.loop.train` (None without tracking, and on processes other than 0). The
    MLflow run is marked finished after training (the report adds to it), failed or killed when training stops."""
    tracker = start_training(cfg, run_dir, fingerprint, resume) if is_main_process() else None
    try:
        yield tracker.step if tracker else None
    except BaseException as e:
        if tracker:
            tracker.close()
            tracker.client.set_terminated(tracker.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if tracker:
        tracker.close()
        tracker.client.set_terminated(tracker.run_id, "FINISHED")


def start_training(cfg: ExperimentConfig, run_dir: Path, fingerprint: str | None, resume: bool) -> Tracker | None:
    """A new MLflow run for this training (resumed training: the one it started), its params and tags logged."""
    if cfg.tracking.mlflow is None:
        return None
    client, uri = _client(cfg)
    record = _record(run_dir, client, uri) if resume else None
    run_id = record or _new_run(client, cfg, run_dir, fingerprint)
    write_json(run_dir / RECORD, {"uri": uri, "run_id": run_id})
    return Tracker(client, run_id)


def finish(run_dir: Path, cfg: ExperimentConfig, results: dict) -> None:
    """The report's figures and files into the training's MLflow run (a new run, with the training log, when the
    training was not tracked), and the run marked finished. Process 0 only."""
    if cfg.tracking.mlflow is None or not is_main_process():
        return
    client, uri = _client(cfg)
    run_id = _record(Path(run_dir), client, uri)
    if run_id is None:
        run_id = _new_run(client, cfg, Path(run_dir), results.get("data_fingerprint"))
        tracker = Tracker(client, run_id)
        for entry in results.get("training", {}).get("log", []):
            tracker.step(entry)
        tracker.close()
        write_json(Path(run_dir) / RECORD, {"uri": uri, "run_id": run_id})
    from mlflow.entities import Metric

    final = [Metric(k, v, _now(), 0) for k, v in final_metrics(results).items()]
    client.log_batch(run_id, metrics=final)
    for name in ARTIFACTS:
        if (Path(run_dir) / name).is_file():
            client.log_artifact(run_id, str(Path(run_dir) / name))
    client.set_terminated(run_id, "FINISHED")


def final_metrics(results: dict) -> dict[str, float]:
    """`task.variant.metric` for every variant's metric, and `task.change_vs_variant.metric.{points, ci_low,
    ci_high, p_value}` for the fine-tuned model against each of them (the paired bootstrap's interval)."""
    out = {}
    for task, t in results.get("tasks", {}).items():
        for variant, metrics in t["results"].items():
            out.update({_key(task, variant, m): v for m, v in metrics.items() if _number(v)})
        for variant, change in t["change"].items():
            for m, c in change.items():
                out.update({_key(task, f"change_vs_{variant}", m, k): c[k] for k in ("points", "ci_low", "ci_high",
                                                                                       "p_value") if _number(c.get(k))})
    if _number(final := results.get("training", {}).get("final_loss")):
        out["training.final_loss"] = final
    return {k: float(v) for k, v in out.items()}


def _client(cfg: ExperimentConfig):
    import mlflow

    try:
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()  # off (see the top): also when mlflow was imported before this module set the switch
    except ImportError:  # an MLflow from before its telemetry
        pass
    for name in ("mlflow.store.db.utils", "alembic"):  # a new SQLite store's migrations, line by line
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = store_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return mlflow.tracking.MlflowClient(uri), uri
    except Exception as e:  # noqa: BLE001 (an unknown scheme, a store that cannot be opened)
        raise InstructuneError(f"cannot open the MLflow store {uri}: {str(e)[:300]}", f"{WHERE}.uri") from None


def _record(run_dir: Path, client, uri: str) -> str | None:
    """The MLflow run of the folder's training, when it was logged to this store and still exists there."""
    saved = read_json(run_dir / RECORD) if (run_dir / RECORD).is_file() else None
    if not isinstance(saved, dict) or saved.get("uri") != uri:
        return None
    try:
        return client.get_run(saved["run_id"]).info.run_id
    except Exception:  # noqa: BLE001 (deleted, or another store at the same URI)
        return None


def _new_run(client, cfg: ExperimentConfig, run_dir: Path, fingerprint: str | None) -> str:
    from mlflow.entities import Param

    experiment_id = _experiment(client, cfg)
    tags = {"instructune.run_dir": str(Path(run_dir).resolve()), "instructune.data_fingerprint": fingerprint,
            "mlflow.source.git.commit": git_commit()}
    run = client.create_run(experiment_id, run_name=cfg.name, tags={k: v for k, v in tags.items() if v})
    params = [Param(k, str(v)) for k, v in _flat(cfg.model_dump(mode="json")).items()]
    client.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def _experiment(client, cfg: ExperimentConfig) -> str:
    """The id of the config's MLflow experiment, created when the store does not have it yet."""
    name = cfg.tracking.mlflow.experiment or cfg.name
    try:
        experiment = client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else client.create_experiment(name, _artifacts(cfg))
    except Exception as e:  # noqa: BLE001 (an unknown scheme, a server that does not answer, a damaged store)
        raise InstructuneError(f"cannot use the MLflow store {store_uri(cfg)}: {str(e).splitlines()[0][:300]}",
                               f"{WHERE}.uri") from None


def _artifacts(cfg: ExperimentConfig) -> str | None:
    """A SQLite store's artifacts in its own folder (else MLflow puts them in ./mlruns wherever the store is)."""
    uri = store_uri(cfg)
    return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri() if uri.startswith("sqlite:///") else None


def git_commit() -> str | None:
    """The commit checked out in the working directory (where the config and data usually live), if it is a repo."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _flat(value, prefix: str = "") -> dict:
    """The config as MLflow params: `train.lr`, `tasks.0.name`; an empty list or table as itself."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None or not value:
        return {prefix: value}
    out = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _key(*parts: str) -> str:
    return ".".join(re.sub(r"[^\w\-. /:]", "_", str(p)) for p in parts)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _now() -> int:
    import time

    return int(time.time() * 1000)
