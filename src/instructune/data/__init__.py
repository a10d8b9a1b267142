"""Data: reading records, recognising their shape, splitting them."""

from .load import Record, load_records
from .shapes import detect_shape
from .splits import read_sources, split_records, split_sources

__all__ = ["Record", "load_records", "detect_shape", "read_sources", "split_records", "split_sources"]
