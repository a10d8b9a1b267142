"""Telling a Hugging Face hub id (`owner/name`) from a local path: one rule for models and data."""

from __future__ import annotations

import re

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# a name ending like a file is a local path that does not exist, never a hub id
_FILE_ENDINGS = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".conll", ".gguf", ".safetensors", ".bin", ".yaml", ".yml")


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` with no path syntax (no leading `/`, `~` or `.`, no empty part) and no file ending."""
    parts = name.split("/")
    return len(parts) == 2 and all(_PART.match(p) for p in parts) and not name.lower().endswith(_FILE_ENDINGS)
