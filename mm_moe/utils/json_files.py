"""JSON files written by others (a Hugging Face folder's config.json, tokenizer_config.json):
a damaged one is a UserError naming the file and what it must hold, not a decoder traceback."""

from __future__ import annotations

import json
from pathlib import Path

from mm_moe.errors import UserError


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in `path`; `what` says what the file should be (for the message)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        data = exc
    if not isinstance(data, dict):
        found = data if isinstance(data, Exception) else f"a JSON {type(data).__name__}"
        raise UserError(f"{path} is not valid: {found}; it must be a JSON object ({what})")
    return data
