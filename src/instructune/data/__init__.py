"""Data: reading records, recognising their shape, splitting them."""

from .load import Record, load_records
from .shapes import detect_shape
from .splits import load_task_splits, split_records

__all__ = ["Record", "load_records", "detect_shape", "load_task_splits", "split_records"]
