"""Utilities every layer may use: secret scrubbing, test-only fault injection parsing."""
