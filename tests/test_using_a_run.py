"""Using a fine-tuned run: `predict` on a file (one output per input, in order), `chat` in a real terminal, and
`export` from the command line (the export functions themselves: tests/test_export.py)."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from typer.testing import CliRunner

from conftest import TASK_RECORDS, tiny_config, write_config, write_jsonl
from instructune.cli import app


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp, tiny_model, ("classification", "summarization"), epochs=2, lr=5e-3)
    cfg["baseline"] = {"enabled": False}
    result = CliRunner().invoke(app, ["run", str(write_config(tmp, cfg))])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_predict_writes_one_record_per_input_in_order_with_label_probabilities(tmp_path, tiny_run):
    rows = [{"text": TASK_RECORDS["classification"](i)["text"], "id": i} for i in range(7)]
    src = write_jsonl(tmp_path / "new.jsonl", rows)
    before = src.read_bytes()
    result = cli("predict", tiny_run, "--input", src, "--task", "tiny_classification")
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "new.predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == list(range(7)) and [r["text"] for r in out] == [r["text"] for r in rows]
    choices = json.loads((tiny_run / "model" / "instructune.json").read_text())["tasks"]["tiny_classification"]["choices"]
    assert all(r["label"] in choices and r["prediction"] == r["label"] and 1 / len(choices) <= r["probability"] <= 1
               for r in out)
    assert src.read_bytes() == before
    # the same answers the evaluation's likelihood scoring would give: the probability is of the argmax choice
    again = cli("predict", tiny_run, "--input", src, "--task", "tiny_classification")
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_predict_generation_task_to_csv(tmp_path, tiny_run):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": TASK_RECORDS["summarization"](i)["text"]} for i in range(3)])
    result = cli("predict", tiny_run, "--input", src, "--task", "tiny_summarization", "--output", tmp_path / "o.csv")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "o.csv").read_text().splitlines()
    assert lines[0] == "text,prediction" and len(lines) == 4


@pytest.mark.parametrize("case", ["bad-line", "missing-field", "several-tasks"])
def test_predict_bad_input_names_the_file_and_line(tmp_path, tiny_run, case):
    src = tmp_path / "in.jsonl"
    if case == "bad-line":
        src.write_text('{"text": "fine"}\n{"text": broken\n')
    else:
        src.write_text('{"body": "no text field"}\n')
    args = ["predict", tiny_run, "--input", src] + ([] if case == "several-tasks" else ["--task", "tiny_classification"])
    result = cli(*args)
    assert result.exit_code == 2, result.output
    expected = {"bad-line": f"{src}:2", "missing-field": f"{src}:1", "several-tasks": "--task"}[case]
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "in.predictions.jsonl").exists()


def test_chat_in_a_pseudo_terminal_answers_streams_resets_and_exits(tiny_run):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "instructune.cli", "chat", str(tiny_run), "--max-new-tokens", "12"],
                          env=env, encoding="utf-8", timeout=120)
    try:
        child.expect("/reset starts a new conversation")
        child.expect_exact("you> ")
        child.sendline("my parcel is late")
        child.expect_exact("model> ")
        child.expect_exact("you> ")  # the reply ended and the prompt came back
        child.sendline("/reset")
        child.expect_exact("(new conversation)")
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# The child runs the real CLI; its replies are made long and slow (never an early end token, 50 ms per token) so the
# Ctrl-C surely lands while one streams.
SLOW = """
import sys, time
import transformers
from transformers import TextIteratorStreamer
from transformers.generation.utils import GenerationMixin
_generate, _put = GenerationMixin.generate, TextIteratorStreamer.put
GenerationMixin.generate = lambda self, *a, **k: _generate(self, *a, **{**k, "min_new_tokens": k["max_new_tokens"]})
def put(self, value):
    time.sleep(0.05)
    return _put(self, value)
TextIteratorStreamer.put = put
from instructune.cli import main
sys.argv = ["instructune", *sys.argv[1:]]
main()
"""


def test_chat_ctrl_c_stops_a_reply_not_the_program(tmp_path, tiny_run):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    child = pexpect.spawn(sys.executable, [str(script), "chat", str(tiny_run), "--max-new-tokens", "400"],
                          env=env, encoding="utf-8", timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        child.expect_exact("you> ")
        child.sendline("tell me everything")
        child.expect_exact("model> ")
        child.sendintr()  # a real Ctrl-C while the reply streams
        child.expect_exact("[stopped]", timeout=15)  # well before 400 tokens x 50 ms
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")


def test_chat_task_mode_renders_the_training_prompt(tiny_run):
    from instructune.chat import chat
    from instructune.models import load_finetuned
    from instructune.predict import record_from_text

    inputs, written = iter(["my parcel is late", "/exit"]), []
    chat(tiny_run, task="tiny_classification", max_new_tokens=4, read=lambda prompt: next(inputs),
         write=lambda *a, **k: written.append("".join(map(str, a))))
    model, tok, meta = load_finetuned(tiny_run)
    template = meta.task_template("tiny_classification")
    fmt = meta.prompt_format(tok, template.separator)
    prompt = fmt.prompt_text(template.prompt_only(record_from_text("my parcel is late", template)))
    from instructune.evaluate.generate import generate

    expected = generate(model, fmt, [prompt], 4)[0]
    assert "".join(written).split("model> ")[1].strip() == expected.strip()


def test_export_gguf_from_the_command_line_checks_parity(tmp_path, tiny_run):
    result = cli("export", tiny_run, "--format", "ollama", "--task", "tiny_classification", "--out", tmp_path / "ol")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ol" / "model.gguf").is_file() and (tmp_path / "ol" / "Modelfile").is_file()
    report = json.loads((tmp_path / "ol" / "parity.json").read_text())
    assert set(report) == {"tiny_classification", "tiny_summarization"}
    assert all(r["n"] == 6 and r["share_identical"] >= 0.8 for r in report.values())  # f16 rounding may flip a few
    assert "greedy answers identical" in result.output


@pytest.mark.parametrize("case", ["format", "dtype", "no-model", "foreign-folder"])
def test_export_refusals_exit_2(tmp_path, tiny_run, case):
    args = {"format": ["--format", "onnx"], "dtype": ["--format", "gguf", "--dtype", "q2_k"],
            "no-model": ["--format", "gguf"], "foreign-folder": ["--format", "merged", "--out", tmp_path / "mine"]}[case]
    target = tmp_path / "empty-run" if case == "no-model" else tiny_run
    target.mkdir(exist_ok=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = cli("export", target, *args)
    assert result.exit_code == 2, result.output
    expected = {"format": "--format", "dtype": "--dtype", "no-model": "no fine-tuned model here",
                "foreign-folder": "mine"}[case]
    assert expected in result.output and "Traceback" not in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_generate_cuts_an_input_longer_than_training_allowed_as_training_did(tiny_run):
    """The one prompt rule: past train.max_length (256 here, inside the model's 1024) the input is cut as training
    cut its prompts, and the command says so, instead of refusing what training would have read."""
    result = cli("generate", "--model", tiny_run, "--task", "tiny_classification", "word " * 20000)
    assert result.exit_code == 0, result.output
    assert "1 of 1 prompts are longer than training's train.max_length 256 allows" in result.output
    assert "Traceback" not in result.output
