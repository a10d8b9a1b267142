"""The masking audit: fail fast on the silent failure of completion-only training."""

from __future__ import annotations

from ..errors import InstructuneError
from ..prompts.format import IGNORE, Encoded


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
