"""The tokenizer trainers' output folder: a trained tokenizer is replaced only on request.

Checkpoints and token shards record a digest of the tokenizer's files (digest.py), so a
tokenizer replaced in place (the demo's, tokenizers/demo, is the trainers' default output)
makes every run and shard made with it refuse to resume or generate.
"""

from __future__ import annotations

from pathlib import Path

from mm_moe.errors import UserError


def refuse_to_replace(output: str, names: list[str], overwrite: bool) -> None:
    """A UserError when `output` already holds one of `names` and `overwrite` is false, or
    cannot be a folder (it, or a folder above it, is a file): before training, which the
    save would otherwise throw away."""
    for folder in (Path(output), *Path(output).parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(
                f"output={output}: {folder} is a file, not a folder; give output=FOLDER (made "
                "if missing) for the tokenizer's files"
            )
    present = [name for name in names if (Path(output) / name).exists()]
    if present and not overwrite:
        raise UserError(
            f"output={output} already holds a trained tokenizer ({', '.join(present)}): "
            "give another output=FOLDER, or overwrite=true to replace it (runs and token "
            "shards made with the old one will then refuse the new one)"
        )
