"""The record shapes we recognise: prompt/completion, Alpaca, OpenAI chat messages, and raw labeled fields."""

from __future__ import annotations

from typing import Any

SHAPES = ("prompt_completion", "alpaca", "messages", "raw")


def detect_shape(data: dict[str, Any]) -> str:
    if isinstance(data.get("messages"), list):
        return "messages"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "instruction" in data and "output" in data:
        return "alpaca"
    return "raw"
