"""instructune: instruction fine-tuning from baseline to report."""

__version__ = "0.1.0"
