"""Rank classification by completion likelihood: exact against a naive reference, order- and batch-independent."""

from __future__ import annotations

import pytest
import torch

from instructune.config import ModelConfig
from instructune.evaluate import likelihood
from instructune.evaluate.likelihood import choice_logprobs, classify_by_likelihood, completion_ids
from instructune.models import load_tokenizer
from instructune.prompts import Pair, PromptFormat

TEXTS = ["The app crashes", "I was charged twice on my invoice, please refund the payment now", "late",
         "Message number 7: my parcel is late and the delivery never arrived at all", "reset my password"]
# Different token lengths; "billing" is a token prefix of "billing delivery".
CHOICES = ["billing", "billing delivery", "technical account Category", "positive"]


# A completion's log-probability is a sum of a few tokens' log-softmax over the vocabulary; batching, padding and the
# prefix cache change the matrix shapes and so the kernels' order of fp32 sums. Measured: 1.6e-7 of the value (AVX2,
# and with MKL's compatible code path and ATen's scalar kernels). Allowed: 2e-6 of the value (~16 fp32 rounding
# units), relative so that it holds for the -60 of a long choice as for the -2 of a short one.
LOGPROB_TOL = dict(rtol=2e-6, atol=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are all per-op overhead; on a busy 2-core machine a second OpenMP thread makes each op ~40x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(path, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(path), ModelConfig(name=str(path)))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    return model, tok


@pytest.fixture(scope="module")
def chat(tiny_model):
    model, tok = _load(tiny_model)
    return model, PromptFormat(tok, chat=True)


def _messages(text):
    return [{"role": "system", "content": "Classify the message."}, {"role": "user", "content": text}]


def _reference(model, fmt, messages_list, choices):
    """Plain full forward on unpadded prompt + completion, completion ids exactly as `encode` trains them."""
    out = torch.zeros((len(messages_list), len(choices)))
    with torch.no_grad():
        for i, messages in enumerate(messages_list):
            for j, choice in enumerate(choices):
                enc = fmt.encode(Pair(messages, choice), max_length=4096, answer_tokens=0)
                start = next(k for k, t in enumerate(enc.labels) if t != -100)
                logp = torch.log_softmax(model(torch.tensor([enc.input_ids])).logits[0].float(), -1)
                out[i, j] = sum(logp[k - 1, enc.input_ids[k]] for k in range(start, len(enc.input_ids)))
    return out


def test_completion_ids_match_training_and_end_with_end_token(chat):
    _, fmt = chat
    for choice in CHOICES:
        enc = fmt.encode(Pair(_messages("anything at all"), choice), max_length=4096, answer_tokens=0)
        assert completion_ids(fmt, choice) == [t for t in enc.labels if t != -100]
        assert completion_ids(fmt, choice)[-1] in fmt.end_ids()
    first = completion_ids(fmt, "billing")
    assert completion_ids(fmt, "billing delivery")[:len(first) - 1] == first[:-1]  # the shared-prefix case is real


@pytest.mark.parametrize("path", ["one-pass", "two-pass", "two-pass-grouped"])
def test_matches_naive_reference(chat, monkeypatch, path):
    model, fmt = chat
    fused = path == "one-pass"
    if path == "two-pass":
        monkeypatch.setattr(likelihood, "fusable", lambda *a: False)  # scoring only: training keeps its own
    if path == "two-pass-grouped":  # a tiny logit budget: no fused pass, and the choices scored one group at a time
        monkeypatch.setattr(likelihood, "LOGIT_BUDGET", 1)
    calls = []
    real = likelihood.score_fused
    monkeypatch.setattr(likelihood, "score_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    messages = [_messages(t) for t in TEXTS]
    prompts = [fmt.prompt_text(m) for m in messages]
    assert len({len(fmt.encode_prompt(p)) for p in prompts}) == len(prompts)  # all lengths differ
    ref = _reference(model, fmt, messages, CHOICES)
    got = choice_logprobs(model, fmt, prompts, CHOICES, batch_size=2)
    assert got.shape == (len(prompts), len(CHOICES))
    torch.testing.assert_close(got, ref, **LOGPROB_TOL)
    # without the shared-prefix cache, and one prompt at a time (no padding at all)
    torch.testing.assert_close(choice_logprobs(model, fmt, prompts, CHOICES, batch_size=3, share_prefix=False), ref,
                               **LOGPROB_TOL)
    torch.testing.assert_close(choice_logprobs(model, fmt, prompts[1:2], CHOICES), ref[1:2], **LOGPROB_TOL)
    assert bool(calls) == fused  # the path under test is the one that ran


def test_eager_attention_and_plain_format(tiny_plain_model):
    model, tok = _load(tiny_plain_model, attn="eager")
    fmt = PromptFormat(tok, chat=False, separator="\nCategory: ")
    messages = [[{"role": "user", "content": t}] for t in TEXTS[:3]]
    prompts = [fmt.prompt_text(m) for m in messages]
    ref = _reference(model, fmt, messages, CHOICES)
    torch.testing.assert_close(choice_logprobs(model, fmt, prompts, CHOICES, batch_size=2), ref, **LOGPROB_TOL)


def test_a_fine_tuned_format_cuts_prompts_as_training_does(chat):
    """With training's max_length (a fine-tuned model's format), each prompt is scored on exactly the tokens training
    kept of it: the first and the end, `max_length - answer_tokens` in all, whatever the choice."""
    model, plain = chat
    answer_tokens, max_length = 8, 32
    fmt = PromptFormat(plain.tok, chat=True, max_length=max_length)
    messages = [_messages(t) for t in TEXTS[:3]]
    prompts = [fmt.prompt_text(m) for m in messages]
    assert all(len(fmt.encode_prompt(p)) > max_length for p in prompts)  # every prompt is cut
    ref = torch.zeros((len(prompts), len(CHOICES)))
    with torch.no_grad():
        for i, m in enumerate(messages):
            trained = fmt.encode(Pair(m, CHOICES[0]), max_length, answer_tokens)
            kept = trained.input_ids[: trained.labels.index(next(t for t in trained.labels if t != -100))]
            assert len(kept) == max_length - answer_tokens and kept[0] == fmt.encode_prompt(prompts[i])[0]
            for j, choice in enumerate(CHOICES):
                ids = kept + completion_ids(fmt, choice)
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
                ref[i, j] = sum(logp[k - 1, ids[k]] for k in range(len(kept), len(ids)))
    got = choice_logprobs(model, fmt, prompts, CHOICES, answer_tokens=answer_tokens)
    torch.testing.assert_close(got, ref, **LOGPROB_TOL)
    # the base model's format (no max_length) scores the whole prompt: different numbers
    assert not torch.allclose(choice_logprobs(model, plain, prompts, CHOICES, answer_tokens=answer_tokens), ref)


def test_input_order_and_batch_size_independence(chat):
    model, fmt = chat
    prompts = [fmt.prompt_text(_messages(t)) for t in TEXTS]
    base = choice_logprobs(model, fmt, prompts, CHOICES, batch_size=16)
    for bs in (1, 2, 3):
        torch.testing.assert_close(choice_logprobs(model, fmt, prompts, CHOICES, batch_size=bs), base, **LOGPROB_TOL)
    perm = [3, 0, 4, 2, 1]
    torch.testing.assert_close(choice_logprobs(model, fmt, [prompts[i] for i in perm], CHOICES), base[perm],
                               **LOGPROB_TOL)
    # argmax in input order; length normalisation divides by the choice's token count
    assert classify_by_likelihood(model, fmt, prompts, CHOICES) == [CHOICES[j] for j in base.argmax(-1).tolist()]
    lengths = torch.tensor([len(completion_ids(fmt, c)) for c in CHOICES], dtype=torch.float32)
    torch.testing.assert_close(choice_logprobs(model, fmt, prompts, CHOICES, length_normalized=True), base / lengths)
    assert choice_logprobs(model, fmt, [], CHOICES).shape == (0, len(CHOICES))
    with pytest.raises(ValueError):
        choice_logprobs(model, fmt, prompts, [])


def test_bf16_runs_close(chat):
    model, fmt = chat
    prompts = [fmt.prompt_text(_messages(t)) for t in TEXTS]
    fp32 = choice_logprobs(model, fmt, prompts, CHOICES)
    got = choice_logprobs(model, fmt, prompts, CHOICES, bf16=True, batch_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the plain forward, unpadded, at the same precision
        ref = _reference(model, fmt, [_messages(t) for t in TEXTS], CHOICES)
    assert not torch.equal(got, fp32)  # bf16 was in effect
    # batching and the prefix cache change which products bf16 rounds, so allow one bf16 rounding unit (2^-8) of
    # the value; measured: 2e-5 of it
    torch.testing.assert_close(got, ref, rtol=2 ** -8, atol=0.0)


def test_model_trained_on_one_label_predicts_it(tiny_model):
    from instructune.train.collate import collate
    from instructune.train.loss import completion_loss_sum

    model, tok = _load(tiny_model)
    fmt = PromptFormat(tok, chat=True)
    choices = ["billing", "delivery", "technical", "account"]
    prompts = [fmt.prompt_text(_messages(t)) for t in ["the parcel never arrived", "charged twice", "hello there"]]
    assert classify_by_likelihood(model, fmt, prompts, choices) != ["technical"] * 3  # not so before training
    train = [fmt.encode(Pair(_messages(f"Message number {i}: {t}"), "technical"), 256, 8)
             for i, t in enumerate(TEXTS * 2)]
    model.train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        batch = collate(train, tok.pad_token_id)
        loss = completion_loss_sum(model, batch) / batch["n_supervised"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert classify_by_likelihood(model, fmt, prompts, choices, batch_size=2) == ["technical"] * 3
    assert model.training  # the scorer puts the model back in the mode it found it in
