"""Which examples train together: length-grouped, shuffled optimizer steps, and passes within a token budget."""

from __future__ import annotations

import math
import random

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


