"""One labeled example as read, with where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    """One labeled example as read, plus its location (`file.jsonl:12`) for error messages.

    `meta["duplicate_keys"]` lists JSON keys given twice in the record (the last value won), for `data lint`."""

    data: dict[str, Any]
    where: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
