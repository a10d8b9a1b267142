"""Evaluation: generation, metrics and significance tests for base vs fine-tuned models."""
