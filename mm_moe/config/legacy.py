"""Configs saved by older versions, in today's keys.

A checkpoint's `config.yaml` is read back with today's schema (`load_pretrained`, `generate`,
export, the upcycle): a key that was renamed since would be refused as unknown, so it is
renamed here first. User YAML is not upgraded: there a renamed key fails with the schema's
"did you mean" error, which names the new key.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _peak_flops(trainer: dict) -> None:
    # trainer.peak_flops (FLOP/s) became trainer.peak_tflops (TFLOP/s).
    if "peak_flops" in trainer:
        value = trainer.pop("peak_flops")
        trainer.setdefault("peak_tflops", float(value or 0.0) / 1e12)


def upgrade_saved_config(values: dict) -> dict:
    """A saved config's dict with older keys renamed to today's (a new dict)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    if isinstance(out.get("trainer"), dict):
        _peak_flops(out["trainer"])
    return out
