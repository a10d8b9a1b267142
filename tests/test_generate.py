"""Batched greedy generation: the shared prompt prefix computed once gives the same outputs as full prompts, in
input order, for any batch size."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructune.evaluate.generate import generate
from instructune.prompts import PromptFormat

MESSAGES = ["my parcel is late", "I was charged twice on my invoice", "the app crashes", "reset my password please",
            "Barack Obama was born in Hawaii", "the cat eats the fish"]


def _model_and_prompts(path, **overrides):
    """(tokenizer, model with larger random weights, plain prompt format, prompts): the greedy tokens of such a model
    depend on the prompt, and each prompt's own words sit near its end."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **overrides)
    fmt = PromptFormat(tok, chat=False, separator="\nCategory:")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    prompts = [fmt.prompt_text([{"role": "user", "content": f"Classify the following message. {m}"}]) for m in MESSAGES]
    return tok, model, fmt, prompts


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_shared_prefix_generation_equals_full_prompts(tiny_model, tiny_gemma, family):
    # Gemma's tiny window (8) is widened so prompt + answer fit in it, as Gemma 3's 512 does for short prompts
    tok, model, fmt, prompts = _model_and_prompts(tiny_model if family == "llama" else tiny_gemma,
                                                  **({} if family == "llama" else {"sliding_window": 128}))
    calls, tokens = [], []
    original = model.generate

    def spy(*args, **kwargs):  # what each batch computed of its prompts, and the raw tokens it generated
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the argument's name in newer transformers
        cached = cache.get_seq_length() if cache is not None else 0
        calls.append(kwargs["input_ids"].shape[1] - cached)
        out = original(*args, **kwargs)
        tokens.extend(out[:, kwargs["input_ids"].shape[1]:].tolist())
        return out

    model.generate = spy
    full = generate(model, fmt, prompts, max_new_tokens=6, batch_size=4, share_prefix=False)
    full_calls, full_tokens = list(calls), list(tokens)
    calls.clear(), tokens.clear()
    shared = generate(model, fmt, prompts, max_new_tokens=6, batch_size=4)
    assert shared == full and tokens == full_tokens  # the same greedy tokens (the random model's are mostly spaces)
    assert len({tuple(t) for t in tokens}) > 1  # and they depend on the prompt
    assert sum(calls) < sum(full_calls)  # fewer prompt tokens computed per batch: the prefix was shared
    assert generate(model, fmt, prompts, max_new_tokens=6, batch_size=1) == full
    assert generate(model, fmt, prompts[::-1], max_new_tokens=6, batch_size=3) == full[::-1]


def test_a_row_stops_once_its_answer_is_settled(tiny_model):
    """`settled` cuts each answer at the first generated token where the test passes, and a batch ends once all its
    rows have stopped (fewer decoding steps); answers that never pass run to the end as before."""
    tok, model, fmt, prompts = _model_and_prompts(tiny_model)
    steps, tokens = [], []
    forward, original = model.forward, model.generate
    model.forward = lambda *a, **k: steps.append(1) or forward(*a, **k)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        tokens.extend(out[:, kwargs["input_ids"].shape[1]:].tolist())
        return out

    model.generate = spy
    full = generate(model, fmt, prompts, max_new_tokens=12, batch_size=6, share_prefix=False)
    order = sorted(range(len(prompts)), key=lambda i: -len(fmt.encode_prompt(prompts[i])))  # the batch's rows
    full_steps, raw = len(steps), {i: tokens[row] for row, i in enumerate(order)}
    steps.clear()
    words = sorted({w for f in full for w in f.split()}, key=lambda w: (sum(w in f for f in full), w))
    marker = next(w for w in words if 0 < sum(w in f for f in full) < len(full))  # in some answers, not all

    def settled(text):
        return marker in text

    special = tok.pad_token
    tok.pad_token = next(t for t in tok.convert_ids_to_tokens(list(range(10, 100))) if t not in tok.all_special_tokens)
    # a pad token that decodes to text: what follows a stopped row must be cut, not merely skipped as special
    cut = generate(model, fmt, prompts, max_new_tokens=12, batch_size=6, share_prefix=False, settled=settled)
    tok.pad_token = special
    for i, (answer, whole) in enumerate(zip(cut, full)):
        if marker in whole:  # the answer as it was at the first token where the marker appeared
            texts = [fmt.clean_generation(tok.decode(raw[i][:n], skip_special_tokens=True)) for n in range(1, 13)]
            assert answer == next(text for text in texts if marker in text) != whole
        else:
            assert answer == whole
    assert len(steps) == full_steps  # one row never settles, so the batch decodes to the end
    assert generate(model, fmt, prompts, max_new_tokens=12, batch_size=6, share_prefix=False,
                    settled=lambda text: False) == full
    steps.clear()
    assert generate(model, fmt, prompts, max_new_tokens=12, batch_size=6, share_prefix=False,
                    settled=lambda text: True) == [fmt.clean_generation(tok.decode(raw[i][:1])) for i in range(6)]
    assert len(steps) == 1  # every row stops at its first token: the batch ends after the prompt's pass
