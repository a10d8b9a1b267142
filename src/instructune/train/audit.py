"""The masking audit: fail fast on the silent failure of completion-only training."""

from __future__ import annotations

from ..errors import InstructuneError
from ..prompts.format import IGNORE, Encoded


def audit_masking(examples: list[Encoded], end_ids: set[int], where: str) -> dict:
    """Fail fast on the silent failure of completion-only training: nothing (or no end token) supervised."""
    if not examples:
        raise InstructuneError("no training examples", where)
    total = sum(len(e.input_ids) for e in examples)
    supervised = turns = 0
    for e in examples:
        sup = [t for t in e.labels if t != IGNORE]
        if not sup:
            raise InstructuneError("no token of this example is supervised (its completion is empty or was truncated away)", e.where or where)
        if sup[-1] not in end_ids:
            raise InstructuneError(f"the last supervised token {sup[-1]} is not an end-of-sequence token {sorted(end_ids)}", e.where or where)
        ends = _turn_ends(e.labels)
        for n, last in enumerate(ends, 1):  # every trained turn of a conversation ends its turn
            if last not in end_ids:
                raise InstructuneError(f"trained assistant turn {n} ends with token {last}, not an end-of-turn token "
                                       f"{sorted(end_ids)}: the model would not learn to stop there", e.where or where)
        supervised += len(sup)
        turns += len(ends)
    return {"examples": len(examples), "tokens": total, "supervised_tokens": supervised,
            "supervised_share": supervised / total, "eos_supervised": True, "trained_turns": turns}


def _turn_ends(labels: list[int]) -> list[int]:
    """The last token of each run of supervised positions (one run per trained turn)."""
    return [t for t, after in zip(labels, labels[1:] + [IGNORE]) if t != IGNORE and after == IGNORE]
