"""The built-in demo suite: synthetic data for five task types, generated offline by `data.py`."""

from .data import SIZES, TASKS, generate, write_demo_data

__all__ = ["TASKS", "SIZES", "generate", "write_demo_data"]
