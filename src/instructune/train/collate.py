"""Training batches laid out so that logits exist only where a loss is taken and no padding is computed.

Pure functions from encoded examples to tensors; the forward pass and the loss are in `loss.py`."""

from __future__ import annotations

import torch

from ..attention import left_pad, positions_of
from ..prompts.format import IGNORE, Encoded

# Longest fused shared-prefix row: its attention is computed densely over the whole row (T x T), which on a CPU cost
# about as much as it saves at ~470 tokens (packing SmolLM2 UCI batches) and is cheap below ~250.
FUSED_MAX = 256
# Where the prefix cannot run as a pass of its own (FSDP, activation checkpointing: `two_pass=False`), the fused row
# is weighed against padded rows that each repeat the prefix (`benchmarks/lean_layers.py`: SmolLM2-135M, fp32, 2
# threads, a forward + backward of 8 examples sharing a 43-token prefix): 8 x 40 tokens of their own, a fused row of 355
# tokens 0.71x the time and 0.60x the activations of 8 padded rows of 82; 8 x 58: 499 tokens, 0.83x and 0.70x. It
# still won at 1,252 tokens (a 300-token prefix), but with a short prefix and long rows the dense T x T
# attention outgrows what sharing saves: the cap stays where every case measured was a clear win.
FUSED_ALONE_MAX = 512


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
            window: int | None = None, fused: bool = False, two_pass: bool = True) -> dict[str, torch.Tensor | int]:
    """A batch whose logits are computed only where a loss is taken, in one of five layouts (same loss, same gradients):

    - `collate_seq2seq`: encoder-decoder examples (prompt to the encoder, completion to the decoder);
    - `_fused_prefix`: all examples share at least `min_shared` leading tokens, the model takes a 4-D mask (`fused`)
      and the row fits `FUSED_MAX` (`FUSED_ALONE_MAX` with `two_pass=False`): one row, the prefix once, then each
      example's own tokens;
    - `_two_pass_prefix`: the same shared prefix otherwise: the prefix once (a KV cache), then padded rows (not with
      `two_pass=False`: under FSDP the prefix's keys and values would reach the loss past FSDP's backward hooks,
      which gather a layer's weights only for gradients through the layer's own output);
    - `_packed` (`packed=True`): one row, no padding, positions restarting per example;
    - `_padded`: left-padded rows with explicit positions (the default).

    `logits_to_keep` is a boolean mask of the positions whose next token is supervised: the model projects only
    those hidden states onto the vocabulary (the costliest layer of a small LM, and most of its activation memory)
    and returns them flattened, in the order of `targets`. A shared prefix is never used when the sequence reaches
    the model's shortest sliding window (`window`): a window would then cover other keys."""
    if examples[0].seq2seq:
        return collate_seq2seq(examples, pad_id)
    rows = [next_tokens(e) for e in examples]
    n_tokens = sum(len(e.input_ids) for e in examples)  # the examples' tokens, as if each had been computed alone
    prefix = shared_prefix_length(examples) if min_shared and not packed else 0
    if prefix >= min_shared > 0:
        width = max(len(ids) for ids, _ in rows) - prefix
        total = prefix + sum(len(ids) - prefix for ids, _ in rows)
        if fused and total <= (FUSED_MAX if two_pass else FUSED_ALONE_MAX) and (window is None or total < window):
            return _fused_prefix(rows, prefix, n_tokens)
        if two_pass and (window is None or prefix + width < window):
            return _two_pass_prefix(rows, prefix, pad_id, n_tokens)
    return _packed(rows, n_tokens) if packed else _padded(rows, pad_id, n_tokens)


def _kept(wanted: torch.Tensor, n_tokens: int) -> dict[str, torch.Tensor | int]:
    """The batch entries for the loss: which positions keep logits (those predicting a trained token; pads never)
    and their targets, in the order the model returns the kept logits."""
    keep = wanted != IGNORE
    return {"logits_to_keep": keep, "targets": wanted[keep], "n_supervised": int(keep.sum()), "n_tokens": n_tokens}


def _padded(rows: list[tuple[list[int], list[int]]], pad_id: int, n_tokens: int) -> dict[str, torch.Tensor | int]:
    """Left-padded rows with explicit positions (each row computed as it would be alone) and an attention mask."""
    ids, mask = left_pad([r for r, _ in rows], pad_id)
    wanted, _ = left_pad([w for _, w in rows], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions_of(mask), **_kept(wanted, n_tokens)}


def _packed(rows: list[tuple[list[int], list[int]]], n_tokens: int) -> dict[str, torch.Tensor | int]:
    """One row with no padding; no attention mask, so transformers derives a block-diagonal causal mask from the
    positions, which restart at 0 for each example: an example never attends to another one. An example's last
    input predicts its end token, never the next example's first."""
    return {"input_ids": torch.tensor([[t for ids, _ in rows for t in ids]]),
            "position_ids": torch.tensor([[p for ids, _ in rows for p in range(len(ids))]]),
            **_kept(torch.tensor([[t for _, w in rows for t in w]]), n_tokens)}


def _two_pass_prefix(rows: list[tuple[list[int], list[int]]], prefix: int, pad_id: int,
                     n_tokens: int) -> dict[str, torch.Tensor | int]:
    """The shared prefix as `prefix_ids` (run once by `completion_loss_sum`, its keys and values attended by every
    row, so every example's gradient flows back into the one prefix computation) and the padded rows after it."""
    batch = _padded([(ids[prefix:], wanted[prefix:]) for ids, wanted in rows], pad_id, n_tokens)
    n = batch["input_ids"].shape[0]
    batch["prefix_ids"] = torch.tensor([rows[0][0][:prefix]])
    batch["attention_mask"] = torch.cat([torch.ones((n, prefix), dtype=torch.long), batch["attention_mask"]], dim=1)
    batch["position_ids"] = batch["position_ids"] + prefix
    return batch


def _fused_prefix(rows: list[tuple[list[int], list[int]]], prefix: int, n_tokens: int) -> dict[str, torch.Tensor | int]:
    """One row: the shared prefix, then each example's own tokens; a 4-D mask lets each example see the prefix and
    its own earlier tokens only."""
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
    ids, mask = left_pad([e.input_ids for e in examples], pad_id)
    target = max(len(e.labels) for e in examples)
    labels = torch.full((len(examples), target), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "seq2seq": True,
            "n_supervised": int((labels != IGNORE).sum()), "n_tokens": sum(len(e.input_ids) + len(e.labels) for e in examples)}
