"""Train/test leakage: exact and near-duplicate inputs between the training and the test split.

Texts are normalised (casefolded, punctuation dropped, whitespace collapsed). A test item is an exact duplicate
when its normalised input equals a training input, and a near duplicate when at least `threshold` of its word
n-grams (n = 3; shorter texts use their words) occur in one training input (containment, found through an
inverted index, so the check is linear in the data, not quadratic)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def _grams(words: list[str], n: int = 3) -> set[tuple[str, ...]]:
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def find_leakage(train: list[str], test: list[str], threshold: float = 0.8, examples: int = 3) -> dict:
    """Count test inputs that also occur in training, exactly or nearly; a few examples for the report."""
    train_norm = [normalize(t) for t in train]
    exact_index = {t: i for i, t in enumerate(train_norm)}
    index: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(train_norm):
        for g in _grams(t.split()):
            index[g].append(i)
    exact, near, shown = 0, 0, []
    for text, norm in zip(test, (normalize(t) for t in test)):
        if not norm:
            continue
        if norm in exact_index:
            exact += 1
            if len(shown) < examples:
                shown.append({"test": text, "train": train[exact_index[norm]], "overlap": 1.0, "kind": "exact"})
            continue
        grams = _grams(norm.split())
        hits = Counter(i for g in grams for i in set(index.get(g, ())))
        if not hits:
            continue
        best, count = hits.most_common(1)[0]
        overlap = count / len(grams)
        if overlap >= threshold:
            near += 1
            if len(shown) < examples:
                shown.append({"test": text, "train": train[best], "overlap": round(overlap, 3), "kind": "near"})
    n = len(test)
    return {"exact": exact, "near": near, "test_size": n, "share": round((exact + near) / n, 4) if n else 0.0,
            "threshold": threshold, "examples": shown}
