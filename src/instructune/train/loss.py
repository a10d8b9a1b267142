"""The completion-only loss: a forward pass over a collated batch, cross-entropy on the kept logits only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention import as_model_mask, cache_kwarg, cache_of, unwrap
from ..prompts.format import IGNORE, Encoded
from ..runtime import autocast
from .collate import collate


def completion_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over completion tokens (divide by the supervised count of the whole optimizer step)."""
    if batch.get("seq2seq"):
        return _seq2seq_loss_sum(model, batch)
    cache = {}
    if "prefix_ids" in batch:  # the shared prefix once, its keys and values repeated for every row (differentiably)
        # under DDP the prefix runs on the wrapped module: its gradient joins the same backward pass, and DDP's
        # per-parameter hooks fire once the contributions of both passes are summed
        inner = unwrap(model)
        no_logits = torch.zeros_like(batch["prefix_ids"], dtype=torch.bool)  # the prefix predicts nothing trained
        shared = cache_of(inner(input_ids=batch["prefix_ids"], use_cache=True, logits_to_keep=no_logits))
        shared.batch_repeat_interleave(batch["input_ids"].shape[0])
        cache = {cache_kwarg(inner): shared, "use_cache": True}
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        mask = as_model_mask(model, mask)
    out = model(input_ids=batch["input_ids"], attention_mask=mask,
                position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"],
                **(cache or {"use_cache": False}))
    return F.cross_entropy(out.logits.float(), batch["targets"], reduction="sum")  # logits: (n_supervised, vocab)


def _seq2seq_loss_sum(model, batch: dict) -> torch.Tensor:
    """Encoder-decoder: the decoder is fed its targets shifted right, after the decoder start token."""
    labels, config = batch["labels"], unwrap(model).config
    decoder_ids = labels.masked_fill(labels == IGNORE, config.pad_token_id)
    start = torch.full_like(decoder_ids[:, :1], config.decoder_start_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=torch.cat([start, decoder_ids[:, :-1]], dim=1), use_cache=False)
    logits = out.logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model, examples: list[Encoded], pad_id: int, batch_size: int, bf16: bool = False) -> float:
    """Mean cross-entropy per completion token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = to_device(collate([examples[i] for i in order[start:start + batch_size]], pad_id), device)
        with autocast(bf16, device):
            total += completion_loss_sum(model, batch).item()
        count += batch["n_supervised"]
    model.train(was_training)
    return total / max(count, 1)


def perplexity(model, examples: list[Encoded], pad_id: int, batch_size: int, bf16: bool = False) -> float:
    """exp(mean cross-entropy per completion token): the validation pairs' perplexity as rendered for training."""
    return math.exp(validation_loss(model, examples, pad_id, batch_size, bf16))
