"""Rank classification: score every choice's completion, exactly as trained, by its log-probability given the prompt.

Instead of generating text and parsing a label out of it, each choice is scored as a completion: the tokens of
`fmt.completion_text(choice)` plus the end-of-turn/EOS token that training appends (`PromptFormat.encode`), summed
log-probabilities given the prompt. The prediction is the best-scoring choice, so it is always a valid label.

The work per batch of prompts is one forward pass: each prompt row is followed by every choice's tokens, and a 4D
attention mask lets each choice see only the prompt and its own earlier tokens (a tree of continuations), with the
vocabulary projection only where an answer token is predicted. The token prefix that all prompts share (system
prompt, instruction) is computed once and its KV cache reused for every batch. Models whose attention cannot take
such a mask (flash attention, sliding windows shorter than the sequence, recurrent layers) get two passes instead:
the prompts with a KV cache, then the choices' tokens with that cache repeated once per choice. Either way choices
that share a token prefix ("very positive" / "very negative") are scored apart, so their sums stay exact."""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ..attention import (as_model_mask, cache_kwarg, cache_of, fusable, left_pad, positions_of, repeated,
                         shared_prefix_cache, text_config)
from ..prompts.format import IGNORE, PromptFormat
from ..prompts.template import Pair
from ..runtime import autocast, grouped_kv_heads
from .generate import model_prompts

# Ceiling on the logits of one choice pass (float32 elements, 256 MiB): many long choices are split into groups.
LOGIT_BUDGET = 1 << 26
_PROBE = [{"role": "user", "content": "x"}]


def completion_ids(fmt: PromptFormat, choice: str) -> list[int]:
    """The token ids a model is trained on for `choice` as the answer: its completion text and the end token.

    Taken from `PromptFormat.encode` itself (its supervised labels), so scoring follows training exactly."""
    encoded = fmt.encode(Pair(_PROBE, choice), max_length=1 << 30, answer_tokens=0)
    return [t for t in encoded.labels if t != IGNORE]


@torch.no_grad()
def choice_logprobs(model, fmt: PromptFormat, prompts: list[str], choices: list[str], batch_size: int = 16,
                    bf16: bool = False, length_normalized: bool = False, share_prefix: bool = True,
                    answer_tokens: int | None = None, desc: str = "scoring") -> torch.Tensor:
    """Log-probability of each choice's completion given each prompt: a float32 tensor [len(prompts), len(choices)].

    Each entry sums log p(token | prompt, earlier completion tokens) over the choice's completion tokens as trained
    (end-of-turn/EOS included, see `completion_ids`). `length_normalized=True` divides by the choice's token
    count (mean log-prob per token), which stops long labels from losing just for being long; the default, the
    plain sum, is the likelihood of the whole answer and the usual choice for short labels.

    `batch_size` counts prompts; rows are ordered longest first and returned in input order. `share_prefix`
    computes the token prefix common to all prompts once. A fine-tuned model's format (`fmt.max_length`) cuts
    prompts as training did (`PromptFormat.prompt_ids`) for answers of `answer_tokens` (the task's max_new_tokens;
    default: the longest choice). `bf16` runs the model under bfloat16 autocast."""
    if not choices:
        raise ValueError("no choices to score")
    if not prompts:
        return torch.zeros((0, len(choices)))
    tok = fmt.tok
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    comps = [completion_ids(fmt, c) for c in choices]
    answer_tokens = max(len(c) for c in comps) if answer_tokens is None else answer_tokens
    encoded = model_prompts(model, fmt, prompts, answer_tokens, desc)  # as trained, never past the context
    if empty := [i for i, e in enumerate(encoded) if not e]:
        raise ValueError(f"prompt {empty[0]} has no tokens: nothing to condition the first answer token on")

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        scores = _choice_logprobs(model, encoded, comps, pad_id, device, batch_size, bf16, share_prefix, desc)
    finally:
        model.train(was_training)
    if length_normalized:
        scores = scores / torch.tensor([len(c) for c in comps], dtype=scores.dtype)
    return scores


def _choice_logprobs(model, encoded, comps, pad_id, device, batch_size, bf16, share_prefix, desc) -> torch.Tensor:
    with grouped_kv_heads(device):
        prefix_len, prefix_cache = 0, None
        if share_prefix:
            longest = max(len(e) for e in encoded) + max(len(c) for c in comps)
            prefix_len, prefix_cache = shared_prefix_cache(model, encoded, longest, bf16, device)
        scores = torch.zeros((len(encoded), len(comps)))
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: memory peaks early
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True, leave=False):
            idx = order[start:start + batch_size]
            cache = repeated(prefix_cache, len(idx)) if prefix_cache is not None else None
            scores[idx] = _score_batch(model, [encoded[i][prefix_len:] for i in idx], encoded[idx[0]][:prefix_len],
                                       cache, comps, pad_id, device, bf16)
    return scores


def _score_batch(model, suffixes: list[list[int]], prefix: list[int], cache, comps: list[list[int]], pad_id: int,
                 device, bf16: bool) -> torch.Tensor:
    """Summed completion log-probs [len(suffixes), len(comps)] for prompts = shared `prefix` (in `cache`) + suffix."""
    ids, mask = left_pad(suffixes, pad_id, prefix)
    ids = ids[:, len(prefix):]  # the prefix itself is in `cache`
    prefix_len = len(prefix)
    n, width = ids.shape
    extra = sum(len(c) - 1 for c in comps)
    vocab = getattr(text_config(model), "vocab_size", None) or 1 << 18
    if extra and n * (extra + 1) * vocab <= LOGIT_BUDGET and fusable(model, prefix_len + width + extra):
        return score_fused(model, ids, mask, prefix_len, cache, comps, device, bf16)
    positions = positions_of(mask)
    with autocast(bf16, device):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions[:, prefix_len:].to(device), use_cache=True, logits_to_keep=1,
                    **{cache_kwarg(model): cache})
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = first[:, [c[0] for c in comps]].cpu()  # the first answer token, predicted by the prompt's last one

    rest = max(len(c) for c in comps) - 1
    if rest == 0:
        return scores
    # The other answer tokens: one row per (prompt, choice), fed its choice's tokens but the last, right-padded.
    cache = cache_of(out)
    prompt_len = mask.sum(-1)  # each row's real length: the next position to fill
    group = max(1, min(len(comps), LOGIT_BUDGET // (n * rest * vocab)))
    for g0 in range(0, len(comps), group):
        members = list(range(g0, min(g0 + group, len(comps))))
        k = len(members)
        rows_cache = cache if k == len(comps) else copy.deepcopy(cache)
        rows_cache.batch_repeat_interleave(k)  # row b*k + j: prompt b, choice members[j]
        inputs = torch.full((k, rest), pad_id, dtype=torch.long)
        targets = torch.zeros((k, rest), dtype=torch.long)
        valid = torch.zeros((k, rest))
        for j, c in enumerate(members):
            t = comps[c]
            inputs[j, :len(t) - 1] = torch.tensor(t[:-1], dtype=torch.long)
            targets[j, :len(t) - 1] = torch.tensor(t[1:], dtype=torch.long)
            valid[j, :len(t) - 1] = 1
        # Padding after a short choice comes later than its real tokens, so causal attention never sees it.
        row_mask = torch.cat([mask.repeat_interleave(k, 0), torch.ones((n * k, rest), dtype=torch.long)], dim=-1)
        row_pos = prompt_len.repeat_interleave(k)[:, None] + torch.arange(rest)[None, :]
        with autocast(bf16, device):
            logits = model(input_ids=inputs.repeat(n, 1).to(device), attention_mask=row_mask.to(device),
                           position_ids=row_pos.to(device), use_cache=True, **{cache_kwarg(model): rows_cache}).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        got = logp.gather(-1, targets.repeat(n, 1)[..., None].to(device))[..., 0].cpu() * valid.repeat(n, 1)
        scores[:, members] += got.sum(-1).view(n, k)
    return scores


def score_fused(model, ids, mask, prefix_len: int, cache, comps: list[list[int]], device, bf16: bool) -> torch.Tensor:
    """Prompts and all choices in one pass: each prompt row is followed by every choice's tokens (but the last), one
    block per choice, and a 4D mask lets a block see the prompt and its own earlier tokens only (a tree of
    continuations), with positions restarting after the prompt for each block."""
    n, width = ids.shape
    blocks = [torch.tensor(c[:-1], dtype=torch.long) for c in comps]
    extra = sum(len(b) for b in blocks)
    q, kv = width + extra, prefix_len + width + extra
    prompt_len = mask.sum(-1)
    allowed = torch.zeros((n, q, kv), dtype=torch.bool)
    allowed[:, :, :prefix_len] = True
    key_real = mask[:, prefix_len:].bool()  # the prompt's own tokens, not its padding
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed[:, :width, prefix_len:prefix_len + width] = causal & key_real[:, None, :]
    eye = torch.arange(width)
    allowed[:, eye, prefix_len + eye] = True  # padding queries see themselves: no row is all masked (NaN-free)
    positions = torch.empty((n, q), dtype=torch.long)
    positions[:, :width] = positions_of(mask)[:, prefix_len:]
    inputs, where = [ids], []
    start = width
    for c, block in zip(comps, blocks):
        m = len(block)
        rows = slice(start, start + m)
        allowed[:, rows, prefix_len:prefix_len + width] = key_real[:, None, :]
        allowed[:, rows, prefix_len + start:prefix_len + start + m] = torch.ones((m, m), dtype=torch.bool).tril()
        positions[:, rows] = prompt_len[:, None] + torch.arange(m)[None, :]
        inputs.append(block.expand(n, m))
        where.append((start - width + 1, c[1:]))  # kept-logit index predicting each later token of this choice
        start += m
    attn = as_model_mask(model, allowed[:, None])
    with autocast(bf16, device):
        out = model(input_ids=torch.cat(inputs, dim=1).to(device), attention_mask=attn.to(device),
                    position_ids=positions.to(device), use_cache=cache is not None, logits_to_keep=extra + 1,
                    **{cache_kwarg(model): cache})
    logp = torch.log_softmax(out.logits.float(), dim=-1)  # [n, extra + 1, vocab]; index 0: the prompt's last token
    scores = logp[:, 0, [c[0] for c in comps]]
    for j, (offset, later) in enumerate(where):
        if later:
            scores[:, j] += logp[:, torch.arange(offset, offset + len(later)), later].sum(-1)
    return scores.cpu()


def classify_by_likelihood(model, fmt: PromptFormat, prompts: list[str], choices: list[str], batch_size: int = 16,
                           bf16: bool = False, desc: str = "scoring", length_normalized: bool = False,
                           answer_tokens: int | None = None) -> list[str]:
    """For each prompt, the choice whose completion (as trained) is most likely; ties go to the earlier choice."""
    scores = choice_logprobs(model, fmt, prompts, choices, batch_size=batch_size, bf16=bf16,
                             length_normalized=length_normalized, answer_tokens=answer_tokens, desc=desc)
    return [choices[j] for j in scores.argmax(-1).tolist()]
