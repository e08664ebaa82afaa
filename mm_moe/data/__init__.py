"""Data: sources of token sequences, packing, and the resumable per-rank loader."""
