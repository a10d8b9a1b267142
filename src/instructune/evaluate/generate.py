"""Greedy generation in length-sorted, left-padded batches with a KV cache; outputs come back in input order.

The token prefix that all prompts share (system prompt, instruction) is computed once and its KV cache reused by
every batch; each batch then computes only its prompts' own tokens (padding sits between the prefix and them)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..attention import left_pad, repeated, shared_prefix_cache
from ..prompts.format import PromptFormat
from ..runtime import autocast, grouped_kv_heads


@torch.no_grad()
def generate(model, fmt: PromptFormat, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             desc: str = "generating", bf16: bool = False, share_prefix: bool = True) -> list[str]:
    with grouped_kv_heads(next(model.parameters()).device):
        return _generate(model, fmt, prompts, max_new_tokens, batch_size, desc, bf16, share_prefix)


def _generate(model, fmt, prompts, max_new_tokens, batch_size, desc, bf16, share_prefix) -> list[str]:
    tok = fmt.tok
    encoded = [fmt.encode_prompt(p) for p in prompts]
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
        cache = {"past_key_values": repeated(prefix_cache, len(idx))} if prefix_cache is not None else {}
        with autocast(bf16, device):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=end_ids, pad_token_id=tok.pad_token_id,
                                 temperature=None, top_p=None, top_k=None, **cache)
        start = 0 if model.config.is_encoder_decoder else length  # a decoder-only output repeats its prompt
        for row, i in enumerate(idx):
            outputs[i] = fmt.clean_generation(tok.decode(out[row, start:], skip_special_tokens=True))
    model.train(was_training)
    return outputs
