"""Data: reading records, recognising their shape, splitting them."""

from .load import load_records
from .record import Record
from .shapes import detect_shape
from .splits import read_sources, split_records, split_sources

__all__ = ["Record", "load_records", "detect_shape", "read_sources", "split_records", "split_sources"]
