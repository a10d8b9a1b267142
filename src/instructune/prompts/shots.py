"""k-shot prompts: which training examples a test prompt shows, and the fallback when they do not fit the context."""

from __future__ import annotations

import random

from .format import PromptFormat
from .template import Pair


def shots_for(train: list[Pair], index: int, k: int, seed: int, task: str) -> list[Pair]:
    """k training examples for test example `index`: a draw seeded by (seed, task, index), so it is the same in every
    run, and nested: the 1-shot example is the k-shot prompt's first."""
    rng = random.Random(f"{seed}/{task}/{index}")
    return rng.sample(train, k)


def kshot_prompts(fmt: PromptFormat, test: list[Pair], train: list[Pair], k: int, seed: int, task: str,
                  room: int) -> list[str]:
    """The prompt of every test pair with k examples before it (k = 0: the bare prompt). A prompt whose tokens would
    exceed `room` (the context length less the answer's tokens) shows the k shortest training examples instead."""
    prompts = []
    for i, pair in enumerate(test):
        examples = shots_for(train, i, k, seed, task) if k else []
        text = fmt.prompt_text(pair.messages, examples, pair.tools)
        if k and len(fmt.encode_prompt(text)) > room:
            examples = sorted(train, key=lambda p: len(p.completion) + len(str(p.messages)))[:k]
            text = fmt.prompt_text(pair.messages, examples, pair.tools)
        prompts.append(text)
    return prompts
