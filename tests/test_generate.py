"""Batched greedy generation: the shared prompt prefix computed once gives the same outputs as full prompts, in
input order, for any batch size."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructune.evaluate.generate import generate
from instructune.prompts import PromptFormat

MESSAGES = ["my parcel is late", "I was charged twice on my invoice", "the app crashes", "reset my password please",
            "Barack Obama was born in Hawaii", "the cat eats the fish"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_shared_prefix_generation_equals_full_prompts(tiny_model, tiny_gemma, family):
    path = tiny_model if family == "llama" else tiny_gemma
    tok = AutoTokenizer.from_pretrained(path)
    # Gemma's tiny window (8) is widened so prompt + answer fit in it, as Gemma 3's 512 does for short prompts
    model = AutoModelForCausalLM.from_pretrained(path, **({} if family == "llama" else {"sliding_window": 128}))
    fmt = PromptFormat(tok, chat=False, separator="\nCategory:")  # each prompt's own words sit near its end
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: the greedy tokens then depend on the prompt
        for p in model.parameters():
            p.normal_(0, 0.3)
    prompts = [fmt.prompt_text([{"role": "user", "content": f"Classify the following message. {m}"}]) for m in MESSAGES]
    calls, tokens = [], []
    original = model.generate

    def spy(*args, **kwargs):  # what each batch computed of its prompts, and the raw tokens it generated
        cached = kwargs["past_key_values"].get_seq_length() if kwargs.get("past_key_values") is not None else 0
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
