"""Inputs longer than the model: generation cuts a prompt that would pass the context from the front (keeping the
first token, as training does) with one warning, and `check_prompt_fits` refuses one with the numbers."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from instructune.errors import InstructuneError
from instructune.evaluate.generate import check_prompt_fits, context_size, fit_context, generate
from instructune.prompts import PromptFormat

CONTEXT = 64
NEW = 8
LONG = "The delivery of my order is late and the parcel never arrived. " * 20  # about 200 tokens


@pytest.fixture
def small(tiny_model):
    """The tiny chat Llama with a 64-position context, and its chat prompt format."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, max_position_embeddings=CONTEXT).eval()
    return model, PromptFormat(AutoTokenizer.from_pretrained(tiny_model), chat=True)


def prompt(fmt: PromptFormat, text: str) -> str:
    return fmt.prompt_text([{"role": "user", "content": f"Classify the following message. {text}"}])


def spy_on(model) -> list[dict]:
    """Record what each model.generate call was given: its input ids (without padding) and the cached prefix."""
    calls, original = [], model.generate

    def spy(*args, **kwargs):
        cached = kwargs["past_key_values"].get_seq_length() if kwargs.get("past_key_values") is not None else 0
        calls.append({"width": kwargs["input_ids"].shape[1], "cached": cached,
                      "rows": [ids[mask.bool()].tolist() for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])]})
        return original(*args, **kwargs)

    model.generate = spy
    return calls


@pytest.mark.parametrize("share_prefix", [False, True])
def test_prompt_longer_than_context_is_cut_with_one_warning(small, capsys, share_prefix):
    model, fmt = small
    prompts = [prompt(fmt, LONG), prompt(fmt, "my parcel is late"), prompt(fmt, LONG + " again")]
    long_ids = fmt.encode_prompt(prompts[0])
    assert len(long_ids) > 150  # the test means something only if the prompt is far past the context
    calls = spy_on(model)
    outputs = generate(model, fmt, prompts, max_new_tokens=NEW, batch_size=2, share_prefix=share_prefix)
    assert len(outputs) == 3 and all(isinstance(o, str) for o in outputs)
    # never fed past the context: every call's inputs plus the new tokens fit in 64 positions
    assert calls and all(c["width"] + NEW <= CONTEXT for c in calls), calls
    # the long prompt kept its first token and its end (the question and the answer cue), as in training
    room = CONTEXT - NEW
    expected = long_ids[:1] + long_ids[len(long_ids) - room + 1:]
    assert expected in [row for c in calls for row in c["rows"]]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    longest = len(fmt.encode_prompt(prompts[2]))
    assert warnings == [f"warning: generating: 2 of 3 prompts pass the model's context of {CONTEXT} tokens (the "
                        f"longest: {longest} tokens + {NEW} new tokens); cut from the front to {room} tokens, "
                        "keeping the first token"], warnings


def test_prompts_that_fit_are_untouched_and_silent(small, capsys):
    model, fmt = small
    prompts = [prompt(fmt, "my parcel is late"), prompt(fmt, "the app crashes")]
    encoded = [fmt.encode_prompt(p) for p in prompts]
    assert fit_context(model, encoded, NEW) == encoded
    calls = spy_on(model)
    generate(model, fmt, prompts, max_new_tokens=NEW, share_prefix=False)
    assert sorted(map(len, calls[0]["rows"])) == sorted(map(len, encoded))
    assert "warning:" not in capsys.readouterr().err


def test_exactly_at_the_context_is_not_cut(small, capsys):
    model, _ = small
    ids = list(range(1, CONTEXT - NEW + 1))  # 56 prompt tokens + 8 new = 64
    assert fit_context(model, [ids], NEW) == [ids]
    assert fit_context(model, [ids + [7]], NEW) == [ids[:1] + ids[2:] + [7]]
    assert capsys.readouterr().err.count("warning:") == 1


def test_max_new_tokens_that_leave_no_room_refused(small):
    model, fmt = small
    with pytest.raises(InstructuneError, match=f"max_new_tokens {CONTEXT} leaves no room .* context of {CONTEXT}"):
        generate(model, fmt, [prompt(fmt, "hi")], max_new_tokens=CONTEXT)


def test_check_prompt_fits_raises_with_the_numbers(small):
    model, fmt = small
    text = prompt(fmt, LONG)
    n = len(fmt.encode_prompt(text))
    with pytest.raises(InstructuneError) as e:
        check_prompt_fits(model, fmt, text, NEW, "generate TEXT")
    assert e.value.where == "generate TEXT"
    assert str(e.value) == (f"generate TEXT: the input is {n} tokens + {NEW} new tokens = {n + NEW}, past the model's "
                            f"context of {CONTEXT} tokens: shorten it by at least {n + NEW - CONTEXT} tokens "
                            "(or lower --max-new-tokens)")


def test_check_prompt_fits_returns_the_length_of_a_prompt_that_fits(small):
    model, fmt = small
    text = prompt(fmt, "my parcel is late")
    assert check_prompt_fits(model, fmt, text, NEW, "x") == len(fmt.encode_prompt(text))
    room = CONTEXT - len(fmt.encode_prompt(text))
    assert check_prompt_fits(model, fmt, text, room, "x") > 0  # exactly full: still fits
    with pytest.raises(InstructuneError, match=f"= {CONTEXT + 1}, past the model's context of {CONTEXT}"):
        check_prompt_fits(model, fmt, text, room + 1, "x")


def test_a_100k_character_input_is_refused_by_check_prompt_fits(tiny_model):
    """Issue 11: a 100k-character `generate` input was fed whole past the model's context (1024 positions)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    fmt = PromptFormat(AutoTokenizer.from_pretrained(tiny_model), chat=True)
    text = prompt(fmt, "x" * 100_000)
    with pytest.raises(InstructuneError, match=r"the input is \d+ tokens \+ 8 new tokens = \d+, past the model's "
                                               r"context of 1024 tokens"):
        check_prompt_fits(model, fmt, text, 8, "generate TEXT")


def test_no_context_in_the_config_means_no_check(tiny_t5, capsys):
    """T5's relative positions have no fixed limit (its config names none): nothing is cut, nothing refused."""
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    fmt = PromptFormat(AutoTokenizer.from_pretrained(tiny_t5), chat=False, seq2seq=True)
    assert context_size(model) is None
    ids = list(range(3, 3000))
    assert fit_context(model, [ids], NEW) == [ids]
    assert check_prompt_fits(model, fmt, "word " * 3000, NEW, "x") >= 3000
    assert "warning:" not in capsys.readouterr().err
