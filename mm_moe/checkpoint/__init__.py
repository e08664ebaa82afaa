"""Checkpoints: atomic step directories, the `latest` pointer, resume."""
