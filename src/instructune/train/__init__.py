"""Training: collation and completion masks (pure functions), the masking audit, the training loop."""
