"""Serving throughput of `instructune serve` on a fine-tuned SmolLM2 run: requests/s and generated tokens/s at 1, 8
and 32 concurrent clients (the official `openai` client, one thread each), with continuous batching and one request
at a time, against `instructune predict` on the same records (the same model, batched: how a file is labelled
without a server), and the share of answers identical between them.

The requests are the run's test records, each sent as its JSON object to the task's model name (`RUN/TASK`), so
every task type works (a question-answering record carries its context). `predict` picks a classification label by
likelihood, the server generates it: on a fine-tuned classifier they agree except where the model hesitates.

    .venv/bin/python benchmarks/serve_throughput.py                  # trains runs/serve-bench (uci-sentiment) once
    .venv/bin/python benchmarks/serve_throughput.py --run runs/uci-sentiment --limit 128 --concurrency 1 8 32

Timing is wall-clock on whatever else the machine runs: give it an idle machine. Each server is warmed up with two
requests before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from instructune import tasktypes  # noqa: E402
from instructune.config import load_config  # noqa: E402
from instructune.manifest import Manifest  # noqa: E402
from instructune.predict import predict_file  # noqa: E402
from instructune.tasks import prepare  # noqa: E402

CLI = [sys.executable, "-m", "instructune.cli"]


def say(*args) -> None:
    print(*args, flush=True)


def bench_run(args) -> Path:
    """The run to serve: --run, or runs/serve-bench trained once from configs/uci-sentiment.yaml (LoRA, 1 epoch)."""
    if args.run:
        return Path(args.run)
    run = ROOT / "runs" / "serve-bench"
    if not (run / "model" / "instructune.json").is_file():
        say(f"training {run} (once) ...")
        subprocess.run(CLI + ["train", str(ROOT / "configs" / "uci-sentiment.yaml"), "--set", "name=serve-bench",
                              "--set", f"output_dir={run}"], check=True, cwd=ROOT)
    return run


def test_records(run: Path, limit: int) -> tuple[str, list[dict]]:
    """The first task's name and its first `limit` test records (as the run's config splits them), without their
    answers."""
    cfg = load_config(run / "config.yaml", [])
    task = prepare(cfg).tasks[0]
    answer = tasktypes.get(task.template.type).answer
    answer = task.template.fields.get(answer, answer)
    return task.name, [{k: v for k, v in r.data.items() if k != answer} for r in task.records["test"][:limit]]


def time_predict(run: Path, task: str, records: list[dict], tmp: Path) -> tuple[float, list[str]]:
    """`predict` on the records, timed whole (loading the model included: that is what the command costs), after a
    warm-up call on two records (Python's imports, the first load's file cache)."""
    src = tmp / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records[:2]), encoding="utf-8")
    predict_file(run, src, tmp / "predictions.jsonl", task, overwrite=True)
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    start = time.perf_counter()
    out, _ = predict_file(run, src, tmp / "predictions.jsonl", task, overwrite=True)
    seconds = time.perf_counter() - start
    return seconds, [json.loads(line)["prediction"] for line in out.read_text().splitlines()]


def start_server(run: Path, batching: bool, log: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(CLI + ["serve", str(run), "--port", str(port)] +
                            ([] if batching else ["--no-continuous-batching"]),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server stopped: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start in 5 minutes")


def time_server(url: str, model: str, records: list[dict], clients: int) -> tuple[float, int, list[str]]:
    import openai

    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def ask(record):
        reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": json.dumps(record)}])
        return reply.choices[0].message.content, reply.usage.completion_tokens

    for record in records[:2]:  # warm-up
        ask(record)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(ask, records))
    return time.perf_counter() - start, sum(n for _, n in answers), [a for a, _ in answers]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a fine-tuned run folder (default: runs/serve-bench, trained once)")
    ap.add_argument("--limit", type=int, default=128, help="test records sent at each concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--modes", nargs="+", default=["batching", "sequential"], choices=["batching", "sequential"])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = bench_run(args)
    task, records = test_records(run, args.limit)
    model = f"{run.name if (run / 'model').is_dir() else run.parent.name}/{task}"
    say(f"{run}: {Manifest.read(run / 'model').base_model_hub_id or 'model'}, task {task}, {len(records)} records; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seconds, reference = time_predict(run, task, records, Path(tmp))
        rows.append(("instructune predict (model load included)", "-", seconds, None, 1.0))
        for mode in args.modes:
            proc, url = start_server(run, mode == "batching", Path(tmp) / f"{mode}.log")
            try:
                for clients in args.concurrency:
                    seconds, tokens, answers = time_server(url, model, records, clients)
                    same = sum(a == b for a, b in zip(answers, reference)) / len(records)
                    rows.append((f"serve, {'continuous batching' if mode == 'batching' else 'one at a time'}",
                                 clients, seconds, tokens, same))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    say(f"\n{'':42} {'clients':>7} {'seconds':>8} {'requests/s':>10} {'tokens/s':>9} {'same as predict':>15}")
    for name, clients, seconds, tokens, same in rows:
        tps = f"{tokens / seconds:9.1f}" if tokens is not None else f"{'-':>9}"
        say(f"{name:42} {clients:>7} {seconds:8.2f} {len(records) / seconds:10.2f} {tps} {100 * same:14.1f}%")


if __name__ == "__main__":
    main()
