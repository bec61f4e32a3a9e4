"""Data sets, measurement sets, models, batches and losses, and checkpoints: what a measurement starts from."""
