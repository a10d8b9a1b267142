"""`instructune serve`: a tiny fine-tuned run behind the OpenAI-compatible API, started as the command it is and
spoken to with the official `openai` client: chat, streaming, the task model names, 16 concurrent requests answered
as `instructune generate` answers them, bad requests answered with OpenAI's 4xx errors, the bind rule, and the
server stopped with its port and engine process freed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TASK_RECORDS, tiny_config, write_config
from instructune.cli import app

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-0123456789"
TASK = "tiny_classification"


@pytest.fixture(scope="module")
def confident_run(tmp_path_factory, tiny_model) -> Path:
    """Fully fine-tuned until every answer's first token leads by a wide margin: batching cannot flip a near-tie."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny_config(tmp, tiny_model, epochs=25, lr=5e-3, method="full", scheduler="constant", eval_every=10_000)
    cfg["baseline"] = {"enabled": False}
    result = CliRunner().invoke(app, ["train", str(write_config(tmp, cfg))])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The processes `pid` started (the engine's), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def running(pid: int) -> bool:
    """Alive: a process that exited but was not reaped yet (a zombie, state Z) has stopped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """`instructune serve RUN --api-key KEY` on a free loopback port, started at once; `url()` waits until it
    answers (a test first does its own work while the server starts)."""

    def __init__(self, run: Path):
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "instructune.cli", "serve", str(run), "--port",
                                      str(self.port), "--api-key", KEY], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.ready = False

    def url(self) -> str:
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while not self.ready and time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                self.ready = True
            except OSError:
                time.sleep(0.2)
        return url


@pytest.fixture(scope="module")
def server(confident_run):
    """The server; stopped with SIGTERM at the end, and checked: exit status 0, the engine's process gone, the port
    free again."""
    server = Server(confident_run)
    yield server
    server.url()
    engine, proc, port = children(server.proc.pid), server.proc, server.port
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert "stopped" in output and "Traceback" not in output
    deadline = time.monotonic() + 20
    while any(map(running, engine)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine and not any(map(running, engine))  # the engine's process stopped too
    with socket.socket() as s:  # the port is free again: nothing listens (connections closed may linger, TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def expected_answers(run: Path, texts: list[str]) -> list[str]:
    """What `instructune generate TEXT --model RUN --task TASK` prints for each text: the same model, prompt and
    generation; one text through the command itself, all of them through the function it calls."""
    import torch

    from instructune.evaluate.generate import generate
    from instructune.models import load_finetuned
    from instructune.predict import record_from_text

    model, tokenizer, manifest = load_finetuned(run)
    template = manifest.task_template(TASK)
    fmt = manifest.prompt_format(tokenizer, template.separator)
    prompts = [fmt.prompt_text(template.prompt_only(record_from_text(t, template))) for t in texts]
    answers = [generate(model, fmt, [p], template.max_new_tokens)[0] for p in prompts]
    with torch.no_grad():  # confident: at every answer token the best leads the next best by a wide margin
        for prompt in prompts:
            ids = fmt.prompt_ids(prompt, template.max_new_tokens)
            for _ in range(template.max_new_tokens):
                top = model(torch.tensor([ids])).logits[0, -1].softmax(-1).topk(2)
                assert float(top.values[0] - top.values[1]) > 0.2, prompt
                ids.append(int(top.indices[0]))
                if ids[-1] in fmt.end_ids():
                    break
    command = CliRunner().invoke(app, ["generate", texts[0], "--model", str(run), "--task", TASK])
    assert command.exit_code == 0 and command.stdout.strip() == answers[0], command.output
    return answers


def test_chat_streaming_task_names_and_16_concurrent_requests_answer_as_generate(server, confident_run):
    texts = [TASK_RECORDS["classification"](i)["text"] for i in range(100, 116)]
    labels = [TASK_RECORDS["classification"](i)["label"] for i in range(100, 116)]
    expected = expected_answers(confident_run, texts)
    assert expected == labels  # confident and right: the comparison below is not between near-ties
    api = client(server.url())
    assert {m.id for m in api.models.list().data} == {"run", f"run/{TASK}"}

    def ask(text):
        reply = api.chat.completions.create(model=f"run/{TASK}", messages=[{"role": "user", "content": text}])
        return reply.model, reply.choices[0].message.content, reply.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:  # at once: the engine batches them
        replies = list(pool.map(ask, texts))
    assert [r[1] for r in replies] == expected
    assert {r[0] for r in replies} == {f"run/{TASK}"} and {r[2] for r in replies} == {"stop"}

    chunks = list(api.chat.completions.create(model=f"run/{TASK}", stream=True,
                                              messages=[{"role": "user", "content": texts[1]}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[1]
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) >= 3

    text = api.completions.create(model=f"run/{TASK}", prompt=texts[2])  # /v1/completions: the same prompt
    assert text.choices[0].text == expected[2]
    own = api.chat.completions.create(model="run", max_tokens=4, messages=[{"role": "user", "content": "hello"}])
    assert own.model == "run" and own.usage.completion_tokens <= 4  # the run's own chat template, free chat
    sampled = {api.chat.completions.create(model="run", max_tokens=8, temperature=2.0, messages=[
        {"role": "user", "content": "hello"}]).choices[0].message.content for _ in range(4)}
    assert len(sampled) > 1  # a temperature samples (greedy by default), under continuous batching too


def _raw(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_never_a_500(server):
    url = server.url()
    api, hi = client(url), [{"role": "user", "content": "hello"}]
    cases = [  # (request, status, param, code)
        (dict(model="nope", messages=hi), 404, "model", "model_not_found"),
        (dict(model="run", messages=hi, n=2), 400, "n", "integer_above_max_value"),
        (dict(model="run", messages=hi, temperature=5), 400, "temperature", "invalid_value"),
        (dict(model="run", messages=hi, max_tokens=0), 400, "max_tokens", "invalid_value"),
        (dict(model="run", messages=[{"role": "user", "content": "late " * 1100}]), 400, "messages",
         "context_length_exceeded"),
        (dict(model=f"run/{TASK}", messages=hi, max_tokens=5000), 400, "messages", "context_length_exceeded"),
        (dict(model="run", messages="hello"), 400, "messages", None),
        (dict(model="run", messages=[{"role": "robot", "content": "x"}]), 400, "messages.[0].role", None),
        (dict(model="run", messages=hi, extra_body={"bogus": 1}), 400, "bogus", None),
        (dict(model="run", messages=hi, stop=[1]), 400, "stop", "invalid_type"),
        (dict(model="run", messages=hi, logit_bias={"x": 500}), 400, "logit_bias", "invalid_type"),
        (dict(model=f"run/{TASK}", messages=[*hi, {"role": "assistant", "content": "x"}]), 400, "messages", None),
    ]
    for kwargs, status, param, code in cases:
        with pytest.raises(openai.APIStatusError) as e:
            api.chat.completions.create(**kwargs)
        assert (e.value.status_code, e.value.param, e.value.code) == (status, param, code), kwargs
        assert e.value.type == "invalid_request_error" and e.value.message, kwargs
    nan = b'{"model": "run", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    for body in (b"not json", b"[1, 2]", b'{"messages": []}', nan):  # bodies the client would never send
        status, error = _raw(url, body)
        assert status == 400 and error["error"]["type"] == "invalid_request_error", (body, error)
    for key in (None, "wrong-key-0000"):  # the API key is required
        status, error = _raw(url, json.dumps({"model": "run", "messages": hi}).encode(), key)
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong-key-0000").models.list()


@pytest.mark.parametrize("args, where", [
    (["--host", "0.0.0.0"], "--host"),  # the network, without an API key
    (["--host", "192.168.1.7"], "--host"),
    (["--host", "not-an-address"], "--host"),
    (["--api-key", "short"], "--api-key"),
    (["--port", "70000"], "--port"),
    (["--task", "no_such_task"], "--task"),
])
def test_serve_refuses_bad_options_before_loading_anything(confident_run, args, where):
    result = CliRunner().invoke(app, ["serve", str(confident_run), *args])
    assert result.exit_code == 2, result.output
    assert where in result.output and "Traceback" not in result.output


def test_serve_refuses_a_port_in_use_and_a_folder_that_is_not_a_run(server, confident_run, tmp_path):
    server.url()  # listening
    result = CliRunner().invoke(app, ["serve", str(confident_run), "--port", str(server.port)])
    assert result.exit_code == 2 and "--port" in result.output, result.output
    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and str(tmp_path) in result.output, result.output


def test_model_names_are_the_run_folder_and_its_tasks(confident_run, monkeypatch):
    from instructune.manifest import Manifest
    from instructune.serve import served_names

    manifest = Manifest.read(confident_run / "model")
    assert served_names(confident_run, manifest, None) == {"run": None, f"run/{TASK}": TASK}
    assert served_names(confident_run / "model", manifest, TASK) == {"run": TASK, f"run/{TASK}": TASK}  # --task
    monkeypatch.chdir(confident_run)
    assert list(served_names(Path("."), manifest, None)) == ["run", f"run/{TASK}"]  # `serve .`
