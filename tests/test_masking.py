"""Completion-only loss: no prompt or padding token is trained, the end-of-sequence token is, padding changes nothing."""

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import GRAD_RTOL, LOSS_RTOL, grads_gap
from instructune.errors import InstructuneError
from instructune.prompts import Pair, PromptFormat
from instructune.prompts.format import Encoded
from instructune.attention import attention_window
from instructune.prompts.format import IGNORE
from instructune.runtime import grouped_kv_heads
from instructune.train.audit import audit_masking
from instructune.train.batching import length_grouped_batches
from instructune.train.collate import collate
from instructune.train.loss import completion_loss_sum


def pair(prompt, completion):
    return Pair([{"role": "user", "content": prompt}], completion, "x.jsonl:1")


@pytest.mark.parametrize("chat", [True, False])
def test_only_completion_and_eos_are_trained(tiny_model, tiny_plain_model, chat):
    tok = AutoTokenizer.from_pretrained(tiny_model if chat else tiny_plain_model)
    fmt = PromptFormat(tok, chat=chat, separator="\nCategory: ")
    enc = fmt.encode(pair("Classify: my parcel is late", "delivery"), max_length=128, answer_tokens=8)
    prompt_ids = fmt.encode_prompt(fmt.prompt_text([{"role": "user", "content": "Classify: my parcel is late"}]))
    n = len(prompt_ids)
    assert enc.input_ids[:n] == prompt_ids  # generation sees exactly the training prompt
    assert all(l == IGNORE for l in enc.labels[:n])  # no prompt token trained
    supervised = [l for l in enc.labels if l != IGNORE]
    assert supervised == enc.input_ids[n:]
    assert supervised[-1] == tok.eos_token_id  # end-of-sequence trained
    assert "delivery" in tok.decode(supervised)
    assert "Classify" not in tok.decode(supervised)


def test_padding_is_masked_and_left_aligned():
    a = Encoded([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8])
    b = Encoded([5, 6, 7, 8, 9, 10, 11], [IGNORE] * 5 + [10, 11])
    batch = collate([a, b], pad_id=0)
    # the last token of each example (its end token) is a target only: no input after it predicts anything trained
    assert batch["input_ids"].tolist() == [[0, 0, 0, 5, 6, 7], [5, 6, 7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]
    assert batch["position_ids"].tolist() == [[0, 0, 0, 0, 1, 2], list(range(6))]
    assert batch["n_supervised"] == 4 and batch["n_tokens"] == 11
    # logits only at the positions that predict a completion token (pads never), and their targets in that order
    assert batch["logits_to_keep"].tolist() == [[False] * 4 + [True, True], [False] * 4 + [True, True]]
    assert batch["targets"].tolist() == [7, 8, 10, 11]


def test_inputs_after_the_last_trained_prediction_are_left_out():
    from instructune.train.collate import next_tokens

    assert next_tokens(Encoded([5, 6, 7, 8, 9], [IGNORE, 6, 7, IGNORE, IGNORE])) == ([5, 6], [6, 7])
    assert next_tokens(Encoded([5, 6, 7], [IGNORE] * 3)) == ([5, 6], [IGNORE, IGNORE])  # nothing trained: all but last
    assert next_tokens(Encoded([5], [IGNORE])) == ([5], [IGNORE])


def test_packed_batch_is_one_row_without_padding():
    a = Encoded([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8])
    b = Encoded([5, 6, 9, 10, 11], [IGNORE] * 3 + [10, 11])
    batch = collate([a, b], pad_id=0, packed=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 5, 6, 9, 10]]
    assert "attention_mask" not in batch  # transformers derives the block-diagonal mask from the positions
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch["logits_to_keep"].tolist() == [[False, True, True, False, False, True, True]]
    assert batch["targets"].tolist() == [7, 8, 10, 11]  # the first example's last input predicts its own end token
    assert batch["n_supervised"] == 4 and batch["n_tokens"] == 9


def _random_examples(seed, shapes=((9, 3), (20, 6), (14, 1), (5, 2))):
    g = torch.Generator().manual_seed(seed)
    return [Encoded(ids := torch.randint(3, 300, (n,), generator=g).tolist(), [IGNORE] * (n - c) + ids[n - c:])
            for n, c in shapes]


def _loss_and_grads(model, batch, grouped_kv: bool):
    model.zero_grad()
    with grouped_kv_heads(torch.device("cpu")) if grouped_kv else contextlib.nullcontext():
        loss = completion_loss_sum(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_packed_batch_equals_padded_batch_in_loss_and_gradients(tiny_model, tiny_gemma, family):
    """Packing must not let examples attend to each other: loss and every gradient equal the padded batch's, and
    equal those of each example alone; with transformers' own key/value head copies or with the grouped heads that
    training uses on a CPU (both tiny models have fewer key/value heads than query heads)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model if family == "llama" else tiny_gemma)
    model.train()  # dropout is 0 in the tiny configs: train mode changes nothing but is what training runs in
    exs = _random_examples(1)
    reference = _loss_and_grads(model, collate(exs, 0), grouped_kv=False)
    alone = [_loss_and_grads(model, collate([e], 0), grouped_kv=False) for e in exs]
    alone = (sum(a[0] for a in alone), {n: sum(a[1][n] for a in alone) for n in reference[1]})
    for packed, grouped_kv in ((False, True), (True, False), (True, True), (None, False)):
        loss, grads = alone if packed is None else _loss_and_grads(model, collate(exs, 0, packed=packed), grouped_kv)
        assert loss == pytest.approx(reference[0], rel=LOSS_RTOL)
        assert grads_gap(grads, reference[1]) < GRAD_RTOL, (packed, grouped_kv)
    padded = reference[0]
    # and the check can fail: without the block-diagonal mask (one plain causal row) the loss differs
    leaky = collate(exs, 0, packed=True)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
    with torch.no_grad():
        assert completion_loss_sum(model, leaky).item() != pytest.approx(padded, rel=1e-3)


def test_padded_batch_loss_equals_unpadded(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    exs = _random_examples(0, ((9, 3), (20, 6), (14, 1)))
    with torch.no_grad():
        alone = sum(completion_loss_sum(model, collate([e], 0)).item() for e in exs)
        together = completion_loss_sum(model, collate(exs, 0)).item()
        # and the same as the full-logits loss the model computes itself
        full = 0.0
        for e in exs:
            out = model(input_ids=torch.tensor([e.input_ids]))
            logits, labels = out.logits[0, :-1], torch.tensor(e.labels[1:])
            full += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
    assert together == pytest.approx(alone, rel=LOSS_RTOL)
    assert together == pytest.approx(full, rel=LOSS_RTOL)
    assert collate(exs, 0)["n_supervised"] == sum(e.n_supervised for e in exs) == 3 + 6 + 1


def test_audit_refuses_data_with_no_supervised_token():
    with pytest.raises(InstructuneError, match="no token of this example is supervised"):
        audit_masking([Encoded([1, 2, 3], [IGNORE] * 3, "d.jsonl:7")], {3}, "train")
    with pytest.raises(InstructuneError, match="d.jsonl:7"):
        audit_masking([Encoded([1, 2, 3], [IGNORE] * 3, "d.jsonl:7")], {3}, "train")


def test_audit_requires_end_of_sequence_trained():
    with pytest.raises(InstructuneError, match="not an end-of-sequence"):
        audit_masking([Encoded([1, 2, 3], [IGNORE, 2, 3], "d.jsonl:2")], {9}, "train")
    report = audit_masking([Encoded([1, 2, 9], [IGNORE, 2, 9])], {9}, "train")
    assert report["supervised_tokens"] == 2 and report["supervised_share"] == pytest.approx(2 / 3)


def test_truncation_keeps_the_completion_and_its_eos(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    fmt = PromptFormat(tok, chat=True)
    enc = fmt.encode(pair("word " * 200, "billing"), max_length=32, answer_tokens=8)
    assert enc.labels[: 32 - 8] == [IGNORE] * (32 - 8) and enc.labels[32 - 8] != IGNORE  # the prompt keeps 32 - 8
    sup = [l for l in enc.labels if l != IGNORE]
    assert sup[-1] == tok.eos_token_id and "billing" in tok.decode(sup)
    # a completion longer than the answer's room takes what the prompt leaves, and still ends with its end token
    long = fmt.encode(pair("word " * 200, "billing " * 40), max_length=32, answer_tokens=8)
    assert len(long.input_ids) == 32 and long.labels.count(IGNORE) == 32 - 8 and long.labels[-1] == tok.eos_token_id
    short = fmt.encode(pair("hi", "billing " * 40), max_length=32, answer_tokens=8)  # a short prompt: uncut
    assert len(short.input_ids) == 32 and short.input_ids[: short.labels.count(IGNORE)] == fmt.encode_prompt(
        fmt.prompt_text(pair("hi", "x").messages)) and short.labels[-1] == tok.eos_token_id


def test_length_grouped_batches_cover_every_example_once():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 3]
    batches = length_grouped_batches(lengths, 2, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert batches == length_grouped_batches(lengths, 2, seed=1)


def test_seq2seq_loss_matches_the_models_own_and_trains_eos(tiny_t5):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from instructune.prompts import PromptFormat
    from instructune.prompts.template import Pair
    from instructune.prompts.format import IGNORE
    from instructune.train.collate import collate
    from instructune.train.loss import completion_loss_sum

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    fmt = PromptFormat(tok, chat=False, separator="\nCategory: ", seq2seq=True)
    pairs = [Pair([{"role": "user", "content": t}], c) for t, c in
             (("The parcel never arrived.", "delivery"), ("I was charged twice on my invoice, please refund.", "billing"))]
    encoded = [fmt.encode(p, 64, 8) for p in pairs]
    for e, p in zip(encoded, pairs):
        assert e.labels[-1] == tok.eos_token_id and IGNORE not in e.labels
        assert tok.decode(e.labels[:-1]).strip() == p.completion and p.completion not in tok.decode(e.input_ids)
    batch = collate(encoded, tok.pad_token_id)
    assert batch["n_supervised"] == sum(e.n_supervised for e in encoded) == sum(len(e.labels) for e in encoded)
    with torch.no_grad():
        ours = completion_loss_sum(model, batch) / batch["n_supervised"]
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, rtol=1e-5)


def test_grouped_kv_heads_switches_transformers_sdpa_on_cpu_only_and_restores_it(monkeypatch):
    from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    mask, kv = torch.ones(1, 1, 4, 4, dtype=torch.bool), torch.zeros(1, 1, 4, 8)
    assert not use_gqa_in_sdpa(mask, kv, kv)  # with a mask, transformers copies the heads (repeat_kv)
    with grouped_kv_heads(torch.device("cpu")):
        assert use_gqa_in_sdpa(mask, kv, kv)
    assert not use_gqa_in_sdpa(mask, kv, kv)
    with grouped_kv_heads(torch.device("meta")):  # not a CPU: transformers' choice stands
        assert not use_gqa_in_sdpa(mask, kv, kv)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_shared_prefix_computed_once_equals_the_padded_batch(tiny_model, tiny_gemma, family, attention):
    """A prefix all examples share is computed once, in one fused pass (one row, 4-D mask) or in two (prefix with a
    KV cache, then padded rows): loss and gradients as if each example had been computed in full. The tiny Gemma's
    sliding window (8) is widened to cover the row, as Gemma 3's 512 does for short examples; a window shorter than
    the fused row falls back to two passes, and one shorter than prefix + row turns sharing off."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model if family == "llama" else tiny_gemma, attn_implementation=attention,
                                                 **({} if family == "llama" else {"sliding_window": 128})).train()
    from instructune.attention import takes_4d_mask

    assert takes_4d_mask(model)
    common = _random_examples(2, ((12, 0),))[0].input_ids
    exs = [Encoded(common + e.input_ids, [IGNORE] * 12 + e.labels) for e in _random_examples(3)]
    two_pass = collate(exs, 0, min_shared=8)
    fused = collate(exs, 0, min_shared=8, window=attention_window(model), fused=True)
    assert two_pass["prefix_ids"].tolist() == [common] and two_pass["input_ids"].shape[1] == 19  # end tokens: targets, not inputs
    assert fused["input_ids"].shape == (1, 12 + 44) and fused["attention_mask"].shape == (1, 1, 56, 56)
    for b in (two_pass, fused):
        assert b["n_supervised"] == sum(e.n_supervised for e in exs) and b["n_tokens"] == sum(len(e.input_ids) for e in exs)
    assert "prefix_ids" not in collate(exs, 0, min_shared=13)  # shorter than asked for: plain padded rows
    assert "prefix_ids" in collate(exs, 0, min_shared=8, window=40, fused=True)  # fused row too long: two passes
    assert "prefix_ids" not in collate(exs, 0, min_shared=8, window=31)  # prefix + row would reach the window
    reference = _loss_and_grads(model, collate(exs, 0), grouped_kv=False)
    for batch, grouped_kv in ((two_pass, False), (two_pass, True), (fused, False), (fused, True)):
        loss, grads = _loss_and_grads(model, batch, grouped_kv)
        assert loss == pytest.approx(reference[0], rel=LOSS_RTOL)
        assert grads_gap(grads, reference[1]) < GRAD_RTOL, grouped_kv
    # the fused mask is what keeps examples apart: without it the loss differs by far more than the tolerance above
    leaky = dict(fused, attention_mask=torch.ones_like(fused["attention_mask"]).tril())
    with torch.no_grad():
        assert completion_loss_sum(model, leaky).item() != pytest.approx(reference[0], rel=1e-4)


def test_without_a_prefix_pass_a_longer_fused_row_replaces_rows_that_repeat_the_prefix():
    """FSDP and checkpointing cannot run the prefix as a pass of its own (`two_pass=False`): a fused row up to
    FUSED_ALONE_MAX tokens is taken instead of padded rows that each repeat the prefix; past it, padded rows."""
    from instructune.train.collate import FUSED_ALONE_MAX, FUSED_MAX

    def batch(own: int, two_pass: bool) -> dict:
        common = _random_examples(5, ((100, 0),))[0].input_ids
        rows = _random_examples(6, ((own, 2),) * 4)
        return collate([Encoded(common + e.input_ids, [IGNORE] * 100 + e.labels) for e in rows], 0, min_shared=16,
                       fused=True, two_pass=two_pass)

    middle, long = batch(60, True), batch(120, False)  # fused rows of 100 + 4 x 59 = 336 and 100 + 4 x 119 = 576
    assert FUSED_MAX < 336 <= FUSED_ALONE_MAX < 576
    assert "prefix_ids" in middle  # with a prefix pass: the prefix once, then rows
    alone = batch(60, False)
    assert alone["input_ids"].shape == (1, 336) and alone["attention_mask"].shape == (1, 1, 336, 336)
    assert "prefix_ids" not in long and long["input_ids"].shape == (4, 219)  # each row repeats the prefix
    assert alone["n_supervised"] == middle["n_supervised"] == 8


def test_shared_prefix_stops_before_any_trained_prediction():
    from instructune.train.collate import shared_prefix_length

    a = Encoded([1, 2, 3, 4, 5], [IGNORE, IGNORE, IGNORE, 4, 5])  # position 2 predicts the first trained token
    b = Encoded([1, 2, 3, 4, 6, 7], [IGNORE] * 4 + [6, 7])
    assert shared_prefix_length([a, b]) == 2 and shared_prefix_length([a]) == 0
    assert shared_prefix_length([b, Encoded([9, 2], [IGNORE, 2])]) == 0
