"""One prompt rule: a prompt longer than training's `max_length` allows is cut the same way in training and in every
use of the fine-tuned model (evaluation, generate, predict, chat), by the same function, and the report counts
the test prompts that were cut."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conftest import tiny_config, write_config
from instructune.cli import app
from instructune.evaluate import generate as generation
from instructune.prompts import PromptFormat
from instructune.prompts.format import IGNORE, fit_prompt, prompt_room

MAX_LENGTH = 40  # the tiny tasks' prompts are 45-70 tokens: every one is cut


def _training_prompt(fmt: PromptFormat, pair, answer_tokens: int) -> list[int]:
    encoded = fmt.encode(pair, MAX_LENGTH, answer_tokens)
    return encoded.input_ids[: next(i for i, label in enumerate(encoded.labels) if label != IGNORE)]


def test_evaluation_reads_each_test_prompt_as_training_cut_it(tmp_path, tiny_model, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_model, ("classification", "summarization"), n_train=4, max_length=MAX_LENGTH)
    cfg["baseline"] = {"enabled": False}
    config = write_config(tmp_path, cfg)
    read: list[list[list[int]]] = []
    real = generation.model_prompts
    monkeypatch.setattr(generation, "model_prompts", lambda *a, **k: read.append(real(*a, **k)) or read[-1])
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output

    from instructune.config import ExperimentConfig
    from instructune.tasks import prepare

    prep = prepare(ExperimentConfig.model_validate(cfg))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for task in prep.tasks:
        room = task.template.max_new_tokens
        trained = [_training_prompt(task.fmt, p, room) for p in task.pairs["test"]]
        whole = [task.fmt.encode_prompt(task.fmt.prompt_text(p.messages)) for p in task.pairs["test"]]
        assert all(len(w) > len(t) == prompt_room(MAX_LENGTH, room) for w, t in zip(whole, trained))  # all cut
        # the evaluation of this task read exactly the training tokens of each test prompt
        assert sorted(trained) in [sorted(r) for r in read], task.name
        assert results["tasks"][task.name]["prompts_cut"] == len(trained)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "test prompts are longer than training's train.max_length" in report


def test_generation_feeds_the_model_the_cut_prompt(tiny_model):
    """Below the spy: `generate` hands the model exactly those tokens (left padding aside), shared prefix or not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructune.prompts import Pair

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    fmt = PromptFormat(AutoTokenizer.from_pretrained(tiny_model), chat=True, max_length=MAX_LENGTH)
    pairs = [Pair([{"role": "user", "content": f"Message {i}: " + "the parcel never arrived " * (i + 3)}], "delivery")
             for i in range(3)]
    prompts = [fmt.prompt_text(p.messages) for p in pairs]
    fed = []
    real = model.generate
    model.generate = lambda input_ids, attention_mask, **k: fed.extend(
        row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)) or real(
        input_ids=input_ids, attention_mask=attention_mask, **k)
    generation.generate(model, fmt, prompts, 8, batch_size=2, share_prefix=False)
    expected = [_training_prompt(fmt, p, 8) for p in pairs]
    assert sorted(fed) == sorted(expected) and all(len(e) == MAX_LENGTH - 8 for e in expected)
    # the base model's format (no max_length) reads the whole prompt
    assert PromptFormat(fmt.tok, chat=True).prompt_ids(prompts[0], 8) == fmt.encode_prompt(prompts[0])


def test_fit_prompt_keeps_the_first_token_and_the_end():
    ids = list(range(10))
    assert fit_prompt(ids, 10) == ids and fit_prompt(ids, 4) == [0, 7, 8, 9] and fit_prompt(ids, 1) == [0]
    assert fit_prompt(ids, 0) == [0]  # never empty: the first token stays
    assert prompt_room(40, 8) == 32 and prompt_room(40, 64) == 20 and prompt_room(40, 64, seq2seq=True) == 40
