"""Deterministic train/validation/test splits (stratified by label for classification); given splits are kept."""

from __future__ import annotations

import random
from collections import defaultdict

from ..config import DataConfig
from ..errors import InstructuneError
from .load import Record, load_records


def split_records(records: list[Record], validation_size: float, test_size: float, seed: int,
                  label_of=None) -> dict[str, list[Record]]:
    """Shuffle with `seed` and cut; with `label_of`, cut each label's group so every split keeps the label mix."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[label_of(r) if label_of else None].append(r)
    rng = random.Random(seed)
    out = {"train": [], "validation": [], "test": []}
    for key in sorted(groups, key=str):
        group = groups[key]
        rng.shuffle(group)
        n_test = round(len(group) * test_size)
        n_val = round(len(group) * validation_size)
        out["test"] += group[:n_test]
        out["validation"] += group[n_test:n_test + n_val]
        out["train"] += group[n_test + n_val:]
    for name in out:  # interleave labels again, deterministically
        rng.shuffle(out[name])
    return out


def read_sources(data: DataConfig) -> dict[str, list[Record]]:
    """The task's records as configured, each file read once: {"all": ...} for one `path` to split, else the given
    {"train", "test"[, "validation"]}."""
    if data.path is not None:
        return {"all": load_records(data.path, data.hub_split)}
    sources = {"train": load_records(data.train, data.hub_split), "test": load_records(data.test, data.hub_split)}
    if data.validation is not None:
        sources["validation"] = load_records(data.validation, data.hub_split)
    return sources


def split_sources(sources: dict[str, list[Record]], data: DataConfig, seed: int, label_of=None,
                  where: str = "data") -> dict[str, list[Record]]:
    """The train/validation/test records of one task: `all` split by seed (stratified with `label_of`), or the
    given splits with a validation split cut from training when none is given; then the configured caps."""
    if "all" in sources:
        splits = split_records(sources["all"], data.validation_size, data.test_size, seed, label_of)
    else:
        splits = dict(sources)
        if "validation" not in splits:
            splits.update({k: v for k, v in split_records(splits["train"], data.validation_size, 0.0, seed, label_of).items()
                           if k in ("train", "validation")})
    for name, cap in (("train", data.max_train), ("validation", data.max_validation), ("test", data.max_test)):
        if cap is not None:
            splits[name] = splits[name][:cap]
    if not splits["train"]:
        raise InstructuneError("the training split is empty", f"{where}")
    if not splits["test"]:
        raise InstructuneError("the test split is empty", f"{where}")
    return splits
