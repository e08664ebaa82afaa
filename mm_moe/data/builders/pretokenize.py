"""Offline tokenization: shards of pairs, interleaved or text to `tokens` shards.

Input shard i becomes output shard `<prefix>-<i>.tar` with the same keys, each sample holding
`KEY.tokens.npy` (int32 unified-vocabulary ids of the whole document, bos to eos) and
`KEY.modality.npy` (uint8), so a large run spends no CPU on decoding and tokenizing. The
tokenization is the training pipeline's own (mm_moe.data.documents), bad samples are skipped
and counted the same way. `vocab.yaml` and `tokenizer.yaml` next to the shards record the
vocabulary and the tokenizer config: the loader refuses local tokens shards whose files differ
from the run's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Literal

import numpy as np
import webdataset as wds
import yaml
from tqdm import tqdm

from mm_moe.data.builders.writer import prepare_output, remove_empty_shards, shard_pattern
from mm_moe.data.defects import REASONS, SPLIT_KEY, SampleError
from mm_moe.data.documents import DecodeOptions, DocumentBuilder, images_left_unread
from mm_moe.data.shards import TOKENIZER_RECORD, expand_urls, tokenizer_record
from mm_moe.data.tar_reader import iter_raw_samples
from mm_moe.errors import UserError
from mm_moe.tokenization.config import TokenizerConfig

log = logging.getLogger(__name__)


@dataclass
class PretokenizeConfig:
    input: str  # shards: brace pattern, folder, glob or pipe: url
    format: Literal["pairs", "interleaved", "text"]
    output: str
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pair_order: Literal["random", "caption_first", "image_first"] = "random"
    caption_first_prob: float = 0.5
    min_image_side: int = 16
    max_aspect_ratio: float = 4.0
    prefix: str = "tokens"
    processes: int = 1  # shards tokenized in parallel
    seed: int = 0  # pair order of shard i is drawn from (seed, i)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise UserError(f"processes={self.processes} must be >= 1")
        self.tokenizer.refuse_raw_text([("format", self.format)])


def pretokenize_shard(index: int, url: str, cfg: PretokenizeConfig, out: Path) -> dict[str, int]:
    """Tokenize one shard; returns {"documents": n, reason: skipped, ...}."""
    options = DecodeOptions(
        cfg.min_image_side, cfg.max_aspect_ratio, cfg.pair_order, cfg.caption_first_prob
    )
    builder = DocumentBuilder(cfg.tokenizer.build(), options)
    rng = np.random.default_rng([cfg.seed, index])
    counts = dict.fromkeys(["documents", *REASONS], 0)
    pattern = str(out / f"{cfg.prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=1 << 62, start_shard=index, verbose=0) as sink:
        try:
            for raw in iter_raw_samples(url):
                try:
                    if raw.defect is not None:
                        raise SampleError(raw.defect, SPLIT_KEY)
                    doc = builder.build(cfg.format, raw, rng)
                except SampleError as error:
                    counts[error.reason] += 1
                    continue
                sink.write(
                    {"__key__": raw.key, "tokens.npy": doc.tokens, "modality.npy": doc.modality}
                )
                counts["documents"] += 1
        except SampleError as error:  # truncated or unreadable: keep what was read
            counts[error.reason] += 1
    return counts


def _check_format(cfg: PretokenizeConfig, first_shard: str) -> None:
    """Refuse a format that would drop what the shards hold (format text on pairs shards keeps
    the captions only), from the first sample of the first shard."""
    samples = iter_raw_samples(first_shard)
    try:
        raw = next(samples, None)
    except SampleError:
        return  # unreadable: counted and reported by the run itself
    finally:
        samples.close()
    if raw is not None and (unread := images_left_unread(cfg.format, raw)):
        raise UserError(
            f"input={cfg.input}: format={cfg.format} reads only KEY.txt, but sample {raw.key} "
            f"of {first_shard} holds images ({', '.join(unread)}) that would be dropped; "
            "format=pairs reads a caption and its image, format=interleaved a .json document"
        )


def build(cfg: PretokenizeConfig) -> str:
    shards = expand_urls(cfg.input, "input")
    _check_format(cfg, shards[0])
    out = prepare_output(cfg.output, cfg.overwrite)
    cfg.tokenizer.build().vocab.save(out / "vocab.yaml")
    record = tokenizer_record(cfg.tokenizer)  # the config and its files' digest
    (out / TOKENIZER_RECORD).write_text(yaml.safe_dump(record, sort_keys=False))
    work = partial(_run_one, cfg=cfg, out=out)
    totals = dict.fromkeys(["documents", *REASONS], 0)
    with Pool(cfg.processes) if cfg.processes > 1 else _Serial() as pool:
        for counts in tqdm(pool.imap(work, enumerate(shards)), total=len(shards), desc="shards"):
            for k, v in counts.items():
                totals[k] += v
    skipped = {k: v for k, v in totals.items() if k != "documents" and v}
    log.info("%d documents written; skipped: %s", totals["documents"], skipped or "none")
    if not totals["documents"]:
        # Nothing for training to mistake for data: the empty shards and their records go.
        remove_empty_shards(out, cfg.prefix)
        for record_file in (out / "vocab.yaml", out / TOKENIZER_RECORD):
            record_file.unlink(missing_ok=True)
        raise UserError(
            f"input={cfg.input}: no usable document in {len(shards)} shard(s) with "
            f"format={cfg.format} (skipped: {skipped or 'nothing readable'}); nothing is "
            f"left in {out}. Check the input and its format"
        )
    return shard_pattern(out, cfg.prefix, len(shards), 1)


def _run_one(item: tuple[int, str], cfg: PretokenizeConfig, out: Path) -> dict[str, int]:
    index, url = item
    return pretokenize_shard(index, url, cfg, out)


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items):
        return map(fn, items)
