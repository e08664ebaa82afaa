"""Modality ids shared by data, model and metrics.

Every token carries one of these ids. The order is part of the checkpoint and shard formats:
append new modalities, never reorder.
"""

TEXT = 0
IMAGE = 1
MODALITIES: tuple[str, ...] = ("text", "image")
NUM_MODALITIES = len(MODALITIES)
