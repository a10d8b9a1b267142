"""Batches for training: exact loss positions, no padding compute (packing or left padding), completion-only loss."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..errors import InstructuneError
from ..prompts.format import Encoded

IGNORE = -100


def collate(examples: list[Encoded], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor | int]:
    """A batch whose logits are computed only where a loss is taken.

    `logits_to_keep` is a boolean mask of the positions whose next token is supervised: the model projects only
    those hidden states onto the vocabulary (the costliest layer of a small LM, and most of its activation memory)
    and returns them flattened, in the order of `targets`.

    Packed (`packed=True`): all examples are concatenated into one row with no padding at all. Positions restart at
    0 for each example and no attention mask is passed, so transformers builds a block-diagonal causal mask from the
    positions: an example never attends to another one. Padded: rows are left-padded with explicit positions, so a
    padded row is computed exactly as it would be alone. Encoder-decoder examples go to `collate_seq2seq`."""
    if examples[0].seq2seq:
        return collate_seq2seq(examples, pad_id)
    if packed:
        ids = torch.tensor([[t for e in examples for t in e.input_ids]])
        labels = torch.tensor([[lab for e in examples for lab in (IGNORE, *e.labels[1:])]])  # none predicts a first token
        positions = torch.tensor([[p for e in examples for p in range(len(e.input_ids))]])
        mask = None
    else:
        length = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            ids[i, length - n:] = torch.tensor(e.input_ids)
            labels[i, length - n:] = torch.tensor(e.labels)
            mask[i, length - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        labels[:, 0] = IGNORE  # nothing predicts the first token
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t + 1
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels, "logits_to_keep": keep,
             "targets": labels[:, 1:][keep[:, :-1]], "n_supervised": int(keep.sum()),
             "n_tokens": sum(len(e.input_ids) for e in examples)}
    if mask is not None:
        batch["attention_mask"] = mask
    return batch


def collate_seq2seq(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor | int]:
    """Encoder prompts padded on the left (as for generation), decoder targets padded on the right with IGNORE."""
    length = max(len(e.input_ids) for e in examples)
    target = max(len(e.labels) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), target), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, length - len(e.input_ids):] = torch.tensor(e.input_ids)
        mask[i, length - len(e.input_ids):] = 1
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "seq2seq": True,
            "n_supervised": int((labels != IGNORE).sum()), "n_tokens": sum(len(e.input_ids) + len(e.labels) for e in examples)}


def completion_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over completion tokens (divide by the supervised count of the whole optimizer step)."""
    if batch.get("seq2seq"):
        labels, config = batch["labels"], getattr(model, "module", model).config  # DDP wraps the model
        decoder_ids = labels.masked_fill(labels == IGNORE, config.pad_token_id)
        start = torch.full_like(decoder_ids[:, :1], config.decoder_start_token_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=torch.cat([start, decoder_ids[:, :-1]], dim=1), use_cache=False)
        logits = out.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"], use_cache=False)
    return F.cross_entropy(out.logits.float(), batch["targets"], reduction="sum")  # logits: (n_supervised, vocab)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort within windows of 50 batches, shuffle batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def audit_masking(examples: list[Encoded], end_ids: set[int], where: str) -> dict:
    """Fail fast on the silent failure of completion-only training: nothing (or no end token) supervised."""
    if not examples:
        raise InstructuneError("no training examples", where)
    total = sum(len(e.input_ids) for e in examples)
    supervised = 0
    for e in examples:
        sup = [t for t in e.labels if t != IGNORE]
        if not sup:
            raise InstructuneError("no token of this example is supervised (its completion is empty or was truncated away)", e.where or where)
        if sup[-1] not in end_ids:
            raise InstructuneError(f"the last supervised token {sup[-1]} is not an end-of-sequence token {sorted(end_ids)}", e.where or where)
        supervised += len(sup)
    return {"examples": len(examples), "tokens": total, "supervised_tokens": supervised,
            "supervised_share": supervised / total, "eos_supervised": True}
