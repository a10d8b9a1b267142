"""What a model's attention allows, and the tensors around it: text config, windows, 4-D masks, left padding, KV caches.

Training (`train/`) and evaluation (`evaluate/`) both build on these; neither imports the other."""

from __future__ import annotations

import copy
import inspect
import os

import torch

from .runtime import autocast


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def text_config(model):
    """The config of the language model (the text part of a multimodal config)."""
    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_window(model) -> int | None:
    """The shortest sliding window or attention chunk of a model's layers (None: every layer sees everything)."""
    config = text_config(model)
    windows = [w for w in (getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None))
               if w is not None]
    return min(windows) if windows else None


def window_fits(model, total_length: int) -> bool:
    """No sliding window or attention chunk is shorter than the sequence (then a mask is the same for every layer)."""
    window = attention_window(model)
    return window is None or total_length < window


def fusable(model, total_length: int) -> bool:
    """Whether one pass with a hand-made 4D attention mask is exact for this model: its attention applies such a mask
    as given (eager, sdpa), every layer is attention, and no sliding window or attention chunk cuts the sequence."""
    config = text_config(model)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if any(t not in ("full_attention", "sliding_attention", "chunked_attention")
           for t in getattr(config, "layer_types", None) or []):
        return False  # recurrent / linear-attention layers carry state that a mask cannot branch
    return window_fits(model, total_length)


def takes_4d_mask(model) -> bool:
    """Whether the model applies a hand-made 4-D attention mask as given (sdpa, eager; attention layers only)."""
    return fusable(model, 0)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the additive float mask eager attention expects."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def as_model_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean 4-D mask in the form the model's attention applies: eager adds it to the scores."""
    return additive_mask(allowed) if text_config(model)._attn_implementation == "eager" else allowed


def left_pad(rows: list[list[int]], pad: int, prefix: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [n, len(prefix) + longest row]: the shared `prefix`, then padding, then each row right-aligned,
    so every row's last token is in the last column; the mask is 1 on real tokens."""
    p, width = len(prefix), max(len(r) for r in rows)
    ids = torch.full((len(rows), p + width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    if p:
        ids[:, :p] = torch.tensor(list(prefix), dtype=torch.long)
        mask[:, :p] = 1
    for i, row in enumerate(rows):
        ids[i, p + width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, p + width - len(row):] = 1
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: each row's first real token is at 0, as if computed alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# -- KV caches ------------------------------------------------------------------------------------------------------
def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: `cache` in newer transformers, `past_key_values` before."""
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # a PEFT wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(out):
    """The KV cache of a forward pass's output (its attribute name depends on the transformers version)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix shared by all sequences, leaving each at least one token of its own."""
    return min(len(os.path.commonprefix(seqs)), min(len(s) for s in seqs) - 1)


def shared_prefix_cache(model, encoded: list[list[int]], total_length: int, bf16: bool, device) -> tuple[int, object]:
    """(length, KV cache) of the token prefix all `encoded` prompts share, computed once; (0, None) when there is
    none, or when a sliding window or attention chunk shorter than `total_length` (prompt + what follows it) would
    see the padding that sits between the prefix and each prompt's own tokens."""
    if len(encoded) < 2 or not window_fits(model, total_length):
        return 0, None
    prefix = common_prefix(encoded)
    if not prefix:
        return 0, None
    with autocast(bf16, device):
        out = model(input_ids=torch.tensor([encoded[0][:prefix]], device=device), use_cache=True, logits_to_keep=1)
    return prefix, cache_of(out)


def repeated(cache, rows: int):
    """A copy of a one-row KV cache for a batch of `rows` (the shared one stays as it is for the next batch)."""
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(rows)
    return cache
