"""Writing samples into shards with webdataset's ShardWriter, with a progress bar.

Every job refuses an output directory that already holds files unless overwrite=true, and
then removes only the kind of files it writes (*.tar, vocab.yaml, tokenizer.yaml).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from mm_moe.errors import UserError

log = logging.getLogger(__name__)


def prepare_output(output: str, overwrite: bool, shard_size: int | None = None) -> Path:
    """The output folder, emptied of this job's kind of files under overwrite=true. The
    arguments it can check come first: a bad one must not cost the shards already there."""
    if shard_size is not None:
        _check_shard_size(shard_size)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"output={output} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"output={output} is not empty; pass overwrite=true to replace its shards, "
                "or choose another output"
            )
        for path in [*out.glob("*.tar"), out / "vocab.yaml", out / "tokenizer.yaml"]:
            if path.is_file():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_shards(
    samples: Iterable[dict],
    out: Path,
    prefix: str,
    shard_size: int,
    total: int | None = None,
    desc: str = "samples",
) -> int:
    """Write `samples` to out/prefix-000000.tar, ...; returns how many were written."""
    _check_shard_size(shard_size)
    pattern = str(out / f"{prefix}-%06d.tar")
    count = 0
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for sample in tqdm(samples, total=total, desc=desc, unit=" samples"):
            sink.write(sample)
            count += 1
    return count


def remove_empty_shards(out: Path, prefix: str) -> None:
    """Remove the shards a run that wrote nothing left (one empty tar): no shard to mistake for
    data."""
    for empty in out.glob(f"{prefix}-*.tar"):
        empty.unlink()


def _check_shard_size(shard_size: int) -> None:
    if shard_size < 1:
        raise UserError(f"shard_size={shard_size} must be positive")


def shard_pattern(out: Path, prefix: str, count: int, shard_size: int) -> str:
    """The brace pattern naming the shards written (for data.sources[].urls)."""
    last = max((count - 1) // shard_size, 0)
    return str(out / f"{prefix}-{{000000..{last:06d}}}.tar")
