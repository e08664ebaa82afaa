"""Text-only shards (`KEY.txt`) from text files.

unit=file makes each file one document; unit=paragraph splits files at blank lines; unit=line
makes every non-empty line a document. Files that are not UTF-8 or hold only whitespace are
reported and left out. A UTF-8 byte order mark at the start of a file is dropped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mm_moe.data.builders.writer import prepare_output, shard_pattern, write_shards
from mm_moe.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class BuildTextConfig:
    input: str  # a text file, or a folder searched recursively for `glob`
    output: str
    glob: str = "*.txt"
    unit: Literal["file", "paragraph", "line"] = "file"
    prefix: str = "text"
    shard_size: int = 1000
    shuffle: bool = True
    seed: int = 0
    overwrite: bool = False


def documents(path: Path, unit: str) -> list[str]:
    text = path.read_text(encoding="utf-8-sig")
    if unit == "file":
        parts = [text]
    elif unit == "paragraph":
        parts = re.split(r"\n\s*\n", text)
    else:
        parts = text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def build(cfg: BuildTextConfig) -> str:
    src = Path(cfg.input)
    files = [src] if src.is_file() else sorted(p for p in src.rglob(cfg.glob) if p.is_file())
    if not files:
        raise UserError(f"input={cfg.input} holds no files matching glob={cfg.glob}")
    docs: list[str] = []
    blank = []
    for path in files:
        try:
            found = documents(path, cfg.unit)
        except UnicodeDecodeError:
            log.warning("%s is not UTF-8: left out", path)
            continue
        docs += found
        if not found:
            blank.append(path)
    if blank:
        log.warning("%d files hold no text and are left out, e.g. %s", len(blank), blank[0])
    if not docs:
        raise UserError(f"input={cfg.input}: no non-empty UTF-8 text")
    out = prepare_output(cfg.output, cfg.overwrite, cfg.shard_size)
    if cfg.shuffle:
        order = np.random.default_rng(cfg.seed).permutation(len(docs))
        docs = [docs[i] for i in order]
    samples = ({"__key__": f"{i:09d}", "txt": d} for i, d in enumerate(docs))
    count = write_shards(samples, out, cfg.prefix, cfg.shard_size, len(docs), "documents")
    return shard_pattern(out, cfg.prefix, count, cfg.shard_size)
