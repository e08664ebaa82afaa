"""Keep secrets off disk and out of logs.

A secret is the value of an environment variable whose name looks like one (WANDB_API_KEY,
HF_TOKEN, AWS_SECRET_ACCESS_KEY, *PASSWORD*, ...). Wherever the run writes text (the resolved
config in checkpoints and wandb, metrics.jsonl, log lines) such values are replaced by `***`,
wherever they appear (say, inside a `pipe:curl -H "Authorization: ..."` url).
"""

from __future__ import annotations

import logging
import os
import re

_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Shorter values (flags such as "1" or "true") would scrub ordinary text.
_MIN_LEN = 8
MASK = "***"


def secret_values(environ=None) -> list[str]:
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_LEN}
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def scrub_text(text: str, values: list[str] | None = None) -> str:
    for value in secret_values() if values is None else values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def scrub(obj, values: list[str] | None = None):
    """A copy of a nested dict/list/str structure with every secret value masked."""
    values = secret_values() if values is None else values
    if not values:
        return obj
    if isinstance(obj, str):
        return scrub_text(obj, values)
    if isinstance(obj, dict):
        return {k: scrub(v, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v, values) for v in obj)
    return obj


class ScrubFilter(logging.Filter):
    """Masks secrets in every record a handler emits (message and arguments formatted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = secret_values()
        if values:
            message = record.getMessage()
            clean = scrub_text(message, values)
            if clean != message:
                record.msg, record.args = clean, ()
        return True


def install_log_scrubber() -> None:
    """Add the filter to the root logger's handlers (idempotent)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
