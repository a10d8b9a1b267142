"""Greedy generation in length-sorted, left-padded batches with a KV cache; outputs come back in input order.

The token prefix that all prompts share (system prompt, instruction) is computed once and its KV cache reused by
every batch; each batch then computes only its prompts' own tokens (padding sits between the prefix and them).
A fine-tuned model's prompt is cut as training cut it (`PromptFormat.prompt_ids`); one that, with its answer, would
still pass the model's context is cut from the front the same way, with a warning.
Given `settled` (a test of the answer so far), a row stops as soon as its answer passes it: evaluation stops a
classification answer once it names a choice that no further text can change (`metrics.choice_settled`)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from transformers import StoppingCriteria, StoppingCriteriaList

from ..attention import cache_kwarg, left_pad, repeated, shared_prefix_cache, text_config
from ..errors import InstructuneError
from ..prompts.format import PromptFormat, fit_prompt
from ..runtime import autocast, grouped_kv_heads, warn


def context_size(model) -> int | None:
    """The most positions the model was built for (None when its config does not say: then nothing is checked)."""
    size = getattr(text_config(model), "max_position_embeddings", None)
    return size if isinstance(size, int) and size > 0 else None


def _room(model, max_new_tokens: int) -> int | None:
    """The most prompt tokens that fit: a decoder holds prompt and answer in one context; an encoder the prompt."""
    size = context_size(model)
    if size is None:
        return None
    return size if model.config.is_encoder_decoder else size - max_new_tokens


def check_prompt_fits(model, fmt: PromptFormat, prompt: str, max_new_tokens: int, where: str | None = None) -> int:
    """The prompt's token count as the model reads it (cut as training cut it: `PromptFormat.prompt_ids`; `generate`
    says so); InstructuneError with the numbers when it and max_new_tokens pass the context."""
    n = len(fmt.prompt_ids(prompt, max_new_tokens))
    room, size = _room(model, max_new_tokens), context_size(model)
    if room is not None and n > room:
        new = "" if model.config.is_encoder_decoder else f" + {max_new_tokens} new tokens = {n + max_new_tokens}"
        raise InstructuneError(f"the input is {n} tokens{new}, past the model's context of {size} tokens: shorten it "
                               f"by at least {n - room} tokens" + ("" if model.config.is_encoder_decoder else
                                                                  " (or lower --max-new-tokens)"), where)
    return n


def model_prompts(model, fmt: PromptFormat, prompts: list[str], max_new_tokens: int, desc: str) -> list[list[int]]:
    """The tokens the model reads for each prompt: cut as training cut it (a fine-tuned model's format, with a
    warning that counts them), then fitted to the model's context (`fit_context`)."""
    if cut := fmt.prompts_cut(prompts, max_new_tokens):
        warn(f"{desc}: {cut} of {len(prompts)} prompts are longer than training's train.max_length {fmt.max_length} "
             "allows; cut as training cut them (the first token and the end)")
    return fit_context(model, [fmt.prompt_ids(p, max_new_tokens) for p in prompts], max_new_tokens, desc)


def fit_context(model, encoded: list[list[int]], max_new_tokens: int, desc: str = "generating") -> list[list[int]]:
    """Each prompt's tokens, cut from the front where they and the answer would pass the model's context.

    As training does (`PromptFormat.encode`): the first token (BOS or the chat template's start) stays and the
    oldest tokens after it go, keeping the end, which holds the question and the answer cue. One warning says how
    many prompts were cut and by how much."""
    room = _room(model, max_new_tokens)
    if room is None:
        return encoded
    if room < 2:
        raise InstructuneError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                               f"{context_size(model)} tokens", "max_new_tokens")
    long = [ids for ids in encoded if len(ids) > room]
    if not long:
        return encoded
    longest = max(map(len, long))
    new = "" if model.config.is_encoder_decoder else f" + {max_new_tokens} new tokens"
    warn(f"{desc}: {len(long)} of {len(encoded)} prompts pass the model's context of {context_size(model)} tokens "
         f"(the longest: {longest} tokens{new}); cut from the front to {room} tokens, keeping the first token")
    return [fit_prompt(ids, room) for ids in encoded]


class _Settled(StoppingCriteria):
    """Stops each row whose answer so far passes `settled`, and remembers how many new tokens it had then."""

    def __init__(self, fmt: PromptFormat, start: int, settled):
        self.fmt, self.start, self.settled, self.lengths = fmt, start, settled, {}  # row: new tokens

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        for row, ids in enumerate(input_ids[:, self.start:].tolist()):
            if row not in self.lengths and self.settled(self.fmt.clean_generation(
                    self.fmt.tok.decode(ids, skip_special_tokens=True))):
                self.lengths[row] = len(ids)
        return torch.tensor([row in self.lengths for row in range(len(input_ids))], device=input_ids.device)


@torch.no_grad()
def generate(model, fmt: PromptFormat, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             desc: str = "generating", bf16: bool = False, share_prefix: bool = True, settled=None) -> list[str]:
    with grouped_kv_heads(next(model.parameters()).device):
        return _generate(model, fmt, prompts, max_new_tokens, batch_size, desc, bf16, share_prefix, settled)


def _generate(model, fmt, prompts, max_new_tokens, batch_size, desc, bf16, share_prefix, settled) -> list[str]:
    tok = fmt.tok
    encoded = model_prompts(model, fmt, prompts, max_new_tokens, desc)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # longest first: memory peaks early
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    end_ids = sorted(fmt.end_ids())
    was_training = model.training
    model.eval()
    prefix, prefix_cache = 0, None
    if share_prefix and not model.config.is_encoder_decoder:
        prefix, prefix_cache = shared_prefix_cache(model, encoded, max(map(len, encoded)) + max_new_tokens, bf16, device)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        idx = order[start:start + batch_size]
        # left padding, between the shared prefix and each prompt's own tokens
        ids, mask = left_pad([encoded[i][prefix:] for i in idx], tok.pad_token_id, encoded[idx[0]][:prefix])
        length = ids.shape[1]
        cache = {cache_kwarg(model): repeated(prefix_cache, len(idx))} if prefix_cache is not None else {}
        start = 0 if model.config.is_encoder_decoder else length  # a decoder-only output repeats its prompt
        stop = _Settled(fmt, start, settled) if settled else None
        with autocast(bf16, device):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=end_ids, pad_token_id=tok.pad_token_id,
                                 temperature=None, top_p=None, top_k=None,
                                 stopping_criteria=StoppingCriteriaList([stop] if stop else []), **cache)
        for row, i in enumerate(idx):
            new = out[row, start:]
            if stop and row in stop.lengths:  # the row's answer settled there; pad tokens follow
                new = out[row, start:start + stop.lengths[row]]
            outputs[i] = fmt.clean_generation(tok.decode(new, skip_special_tokens=True))
    model.train(was_training)
    return outputs
