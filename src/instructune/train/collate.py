"""Batches for training: exact loss positions, no padding compute (packing or left padding), completion-only loss."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..errors import InstructuneError
from ..prompts.format import Encoded

IGNORE = -100
# Longest fused shared-prefix row: its attention is computed densely over the whole row (T x T), which on a CPU cost
# about as much as it saves at ~470 tokens (packing SmolLM2 UCI batches) and is cheap below ~250.
FUSED_MAX = 256


def shared_prefix_length(examples: list[Encoded]) -> int:
    """Tokens that every example begins with (system prompt, instruction), ending before any position whose
    prediction is trained, so each example keeps every logit it needs in its own part."""
    if len(examples) < 2:
        return 0
    limit = min(min(next((i for i, t in enumerate(e.labels) if t != IGNORE), len(e.labels)), len(e.input_ids) - 1) - 1
                for e in examples)  # (and each example keeps at least one input of its own: see `next_tokens`)
    first = examples[0].input_ids
    n = 0
    while n < limit and all(e.input_ids[n] == first[n] for e in examples):
        n += 1
    return n


def next_tokens(e: Encoded) -> tuple[list[int], list[int]]:
    """An example's inputs and, for each input position, the token it is trained to predict (IGNORE: none).

    Positions after the last trained prediction are dropped: their outputs would feed nothing (causal attention
    looks only backwards), so the final end-of-sequence token is a target but never an input."""
    wanted = e.labels[1:]
    last = max((i for i, t in enumerate(wanted) if t != IGNORE), default=max(len(wanted) - 1, 0))
    return e.input_ids[:last + 1], list(wanted[:last + 1]) + [IGNORE] * (last + 1 - len(wanted))


def collate(examples: list[Encoded], pad_id: int, packed: bool = False, min_shared: int = 0,
            window: int | None = None, fused: bool = False) -> dict[str, torch.Tensor | int]:
    """A batch whose logits are computed only where a loss is taken.

    `logits_to_keep` is a boolean mask of the positions whose next token is supervised: the model projects only
    those hidden states onto the vocabulary (the costliest layer of a small LM, and most of its activation memory)
    and returns them flattened, in the order of `targets`. Inputs after an example's last trained prediction (its
    end token) are left out (`next_tokens`).

    Packed (`packed=True`): all examples are concatenated into one row with no padding at all. Positions restart at
    0 for each example and no attention mask is passed, so transformers builds a block-diagonal causal mask from the
    positions: an example never attends to another one. Padded: rows are left-padded with explicit positions, so a
    padded row is computed exactly as it would be alone. Encoder-decoder examples go to `collate_seq2seq`.

    Shared prefix (`min_shared > 0`, not packed): when all examples begin with the same `min_shared` tokens or more
    (a system prompt, an instruction), those are returned once as `prefix_ids` and the rows hold only each example's
    own tokens; `completion_loss_sum` runs the prefix once, and every row attends to its keys and values (so the
    gradients of all examples flow back into the one prefix computation). Same loss and gradients, fewer tokens.
    With `fused` (for models whose attention takes a hand-made mask: sdpa, eager) and rows of up to `FUSED_MAX`
    tokens it is one pass over one row, prefix then each example's own tokens, no padding, and a 4-D mask that lets
    each example see the prefix and its own earlier tokens only; else two passes (the prefix with a KV cache, then
    the padded rows). Neither when the sequence reaches the model's shortest sliding window (`window`): a window
    would then cover other keys."""
    if examples[0].seq2seq:
        return collate_seq2seq(examples, pad_id)
    rows = [next_tokens(e) for e in examples]
    n_tokens = sum(len(e.input_ids) for e in examples)  # the examples' tokens, as if each had been computed alone
    prefix = shared_prefix_length(examples) if min_shared and not packed else 0
    width = max(len(ids) for ids, _ in rows) - prefix
    total = prefix + sum(len(ids) - prefix for ids, _ in rows)
    if prefix >= min_shared > 0 and fused and total <= FUSED_MAX and (window is None or total < window):
        return _collate_fused(rows, prefix, n_tokens)
    if prefix >= min_shared > 0 and (window is None or prefix + width < window):
        batch = _padded([(ids[prefix:], wanted[prefix:]) for ids, wanted in rows], pad_id, n_tokens)
        n = batch["input_ids"].shape[0]
        batch["prefix_ids"] = torch.tensor([rows[0][0][:prefix]])
        batch["attention_mask"] = torch.cat([torch.ones((n, prefix), dtype=torch.long), batch["attention_mask"]], dim=1)
        batch["position_ids"] = batch["position_ids"] + prefix
        return batch
    if not packed:
        return _padded(rows, pad_id, n_tokens)
    # an example's last input predicts its end token, never the next example's first
    return {"input_ids": torch.tensor([[t for ids, _ in rows for t in ids]]),
            "position_ids": torch.tensor([[p for ids, _ in rows for p in range(len(ids))]]),
            **_kept(torch.tensor([[t for _, w in rows for t in w]]), n_tokens)}


def _kept(wanted: torch.Tensor, n_tokens: int) -> dict[str, torch.Tensor | int]:
    """The batch entries for the loss: which positions keep logits (those predicting a trained token; pads never)
    and their targets, in the order the model returns the kept logits."""
    keep = wanted != IGNORE
    return {"logits_to_keep": keep, "targets": wanted[keep], "n_supervised": int(keep.sum()), "n_tokens": n_tokens}


def _padded(rows: list[tuple[list[int], list[int]]], pad_id: int, n_tokens: int) -> dict[str, torch.Tensor | int]:
    """Left-padded rows with explicit positions (each row computed as it would be alone) and an attention mask."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    wanted = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, w) in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        wanted[i, length - len(row):] = torch.tensor(w, dtype=torch.long)
        mask[i, length - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            **_kept(wanted, n_tokens)}


def _collate_fused(rows: list[tuple[list[int], list[int]]], prefix: int, n_tokens: int) -> dict[str, torch.Tensor | int]:
    """One row: the shared prefix, then each example's own tokens; a 4-D mask keeps the examples apart."""
    ids, positions, wanted = list(rows[0][0][:prefix]), list(range(prefix)), [IGNORE] * prefix
    blocks = []
    for own, w in rows:
        start = len(ids)
        ids += own[prefix:]
        positions += range(prefix, len(own))
        wanted += w[prefix:]
        blocks.append((start, len(ids)))
    allowed = torch.zeros((len(ids), len(ids)), dtype=torch.bool)
    allowed[:prefix, :prefix] = torch.ones((prefix, prefix), dtype=torch.bool).tril()
    for start, end in blocks:
        allowed[start:end, :prefix] = True
        allowed[start:end, start:end] = torch.ones((end - start, end - start), dtype=torch.bool).tril()
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]), "attention_mask": allowed[None, None],
            **_kept(torch.tensor([wanted]), n_tokens)}


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


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def text_config(model):
    """The config of the language model (the text part of a multimodal config)."""
    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the additive float mask eager attention expects."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def takes_4d_mask(model) -> bool:
    """Whether the model applies a hand-made 4-D attention mask as given (sdpa, eager; attention layers only)."""
    from ..evaluate.likelihood import _fusable

    return _fusable(model, 0)


def attention_window(model) -> int | None:
    """The shortest sliding window or attention chunk of a model's layers (None: every layer sees everything)."""
    config = text_config(model)
    windows = [w for w in (getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None))
               if w is not None]
    return min(windows) if windows else None


def completion_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over completion tokens (divide by the supervised count of the whole optimizer step)."""
    if batch.get("seq2seq"):
        labels, config = batch["labels"], unwrap(model).config
        decoder_ids = labels.masked_fill(labels == IGNORE, config.pad_token_id)
        start = torch.full_like(decoder_ids[:, :1], config.decoder_start_token_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=torch.cat([start, decoder_ids[:, :-1]], dim=1), use_cache=False)
        logits = out.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    cache = {}
    if "prefix_ids" in batch:  # the shared prefix once, its keys and values repeated for every row (differentiably)
        from ..evaluate.likelihood import _cache_kwarg, _cache_of

        # under DDP the prefix runs on the wrapped module: its gradient joins the same backward pass, and DDP's
        # per-parameter hooks fire once the contributions of both passes are summed
        inner = unwrap(model)
        kwarg = _cache_kwarg(inner)
        no_logits = torch.zeros_like(batch["prefix_ids"], dtype=torch.bool)  # the prefix predicts nothing trained
        shared = _cache_of(inner(input_ids=batch["prefix_ids"], use_cache=True, logits_to_keep=no_logits))
        shared.batch_repeat_interleave(batch["input_ids"].shape[0])
        cache = {kwarg: shared, "use_cache": True}
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4 and text_config(model)._attn_implementation == "eager":
        mask = additive_mask(mask)
    out = model(input_ids=batch["input_ids"], attention_mask=mask,
                position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"],
                **(cache or {"use_cache": False}))
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


def split_by_tokens(indices: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """`indices` in as few passes of similar-length examples as keep each pass's padded size (rows x longest row)
    within `budget` tokens (an example longer than that gets a pass of its own); `budget` 0: one pass."""
    order = sorted(indices, key=lambda i: lengths[i])
    for parts in range(1, len(order) + 1):
        size = math.ceil(len(order) / parts)
        chunks = [order[j:j + size] for j in range(0, len(order), size)]
        if not budget or all(len(c) * lengths[c[-1]] <= budget for c in chunks) or size == 1:
            return chunks
    return [order]


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
