"""Batches for training: left padding, explicit positions, and the completion-only loss on kept logits."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..errors import InstructuneError
from ..prompts.format import Encoded

IGNORE = -100


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor | int]:
    """Left-pad a batch so every completion ends at the last position.

    Then the logits needed for the loss are the last `logits_to_keep` positions: the model skips the vocabulary
    projection (the costliest layer of a small LM) for the whole prompt. Positions are given explicitly so a
    padded row is computed exactly as it would be alone."""
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
    supervised = (labels != IGNORE).sum(-1)
    first = int(((labels != IGNORE).float().argmax(-1)).min())  # earliest supervised position in the batch
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels,
            "logits_to_keep": length - first + 1, "n_supervised": int(supervised.sum())}


def completion_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over completion tokens (divide by the supervised count of the whole optimizer step)."""
    keep = batch["logits_to_keep"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, -keep + 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


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
