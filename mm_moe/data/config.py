"""Data configuration (the `data` config group)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from mm_moe.errors import UserError
from mm_moe.tokenization.config import TokenizerConfig

# The slopes (a, b) of the synthetic images' patterns, each named by a caption word.
SYNTHETIC_SLOPES = (1, 2, 3, 5)


@dataclass
class SyntheticPatternsConfig:
    text_vocab_size: int = 256
    image_codebook_size: int = 64
    # Images are image_side x image_side codes.
    image_side: int = 6
    mean_text_len: int = 24
    # Probability that a document contains an image.
    image_prob: float = 0.6

    def __post_init__(self) -> None:
        least = 2 * len(SYNTHETIC_SLOPES) + 2
        if self.text_vocab_size < least:
            raise UserError(f"data.synthetic.text_vocab_size must be >= {least}")
        if self.image_codebook_size < 2 or self.image_side < 1 or self.mean_text_len < 1:
            raise UserError("data.synthetic sizes must be positive")
        if not 0.0 <= self.image_prob <= 1.0:
            raise UserError(f"data.synthetic.image_prob={self.image_prob} must be in [0, 1]")


@dataclass
class SourceConfig:
    # Shards: a brace pattern (/data/pairs-{000000..000099}.tar), a path, a directory (every
    # *.tar in it), a glob, or `pipe:COMMAND` (e.g. pipe:curl -s URL): runs COMMAND in a shell,
    # so data configs must come from trusted hands. Or a list of those.
    urls: str | list[str]
    # pairs | interleaved | text | tokens (docs/data.md describes each).
    format: Literal["pairs", "interleaved", "text", "tokens"]
    # Sources are mixed by weight, document by document.
    weight: float = 1.0


@dataclass
class DataConfig:
    # synthetic_patterns: the in-process source (no files). webdataset: tar shards (`sources`).
    source: Literal["synthetic_patterns", "webdataset"] = "synthetic_patterns"
    # Tokens per packed training sequence.
    seq_len: int = 128
    synthetic: SyntheticPatternsConfig = field(default_factory=SyntheticPatternsConfig)

    # ---- webdataset ----
    sources: list[SourceConfig] = field(default_factory=list)
    # Logical streams, each over a fixed set of shards. trainer.global_batch_size must be a
    # multiple; choose a multiple of every data-parallel size you may run at.
    num_streams: int = 8
    # Dataloader worker processes per rank (0: read in the training process).
    num_workers: int = 2
    # skip: drop a bad sample and count it under data/skipped_<reason>; raise: fail, naming
    # the shard and the key.
    on_error: Literal["skip", "raise"] = "skip"
    # Order of image-text pairs: random (caption first with probability caption_first_prob),
    # caption_first or image_first.
    pair_order: Literal["random", "caption_first", "image_first"] = "random"
    caption_first_prob: float = 0.5
    # true: a document that fits in a sequence but not in what is left of the current one
    # starts the next sequence, the rest padded and masked from the loss, so an image-caption
    # pair is never cut in two (a cut pair's second half sees nothing of its first: attention
    # stays inside a sequence). false: documents are concatenated and cut every seq_len + 1
    # tokens, no padding. Longer documents are cut either way.
    whole_documents: bool = False
    # Images with a shorter side below this (pixels) are skipped (data/skipped_small_image).
    min_image_side: int = 16
    # Images whose longer side exceeds this multiple of the shorter are skipped.
    max_aspect_ratio: float = 4.0
    # Encoded images each data worker keeps, by the digest of the image's bytes (LRU), so a
    # corpus read for several epochs is VQ-encoded once per worker. 0: encode every time (a
    # corpus seen once gains nothing). About 300 bytes per 49-token image.
    image_cache_size: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise UserError(f"data.seq_len={self.seq_len} must be at least 2")
        if self.source == "webdataset" and not self.sources:
            raise UserError(
                "data.source=webdataset needs data.sources: a list of {urls, format, weight}"
            )
        if self.source != "webdataset" and self.sources:
            raise UserError(
                f"data.sources is set but data.source={self.source}, which does not read it: "
                "set data.source=webdataset (or data=webdataset, or `defaults: [webdataset]` in "
                "your data config) to train on the shards, or drop data.sources"
            )
        for i, src in enumerate(self.sources):
            if not src.weight > 0:
                raise UserError(f"data.sources[{i}].weight={src.weight} must be positive")
            if not src.urls:
                raise UserError(f"data.sources[{i}].urls is empty")
        if self.num_streams < 1:
            raise UserError(f"data.num_streams={self.num_streams} must be at least 1")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers} must be >= 0")
        if not 0.0 <= self.caption_first_prob <= 1.0:
            raise UserError(f"data.caption_first_prob={self.caption_first_prob} must be in [0, 1]")
        if self.min_image_side < 1:
            raise UserError(f"data.min_image_side={self.min_image_side} must be positive")
        if not self.max_aspect_ratio >= 1.0:
            raise UserError(f"data.max_aspect_ratio={self.max_aspect_ratio} must be >= 1")
        if self.image_cache_size < 0:
            raise UserError(f"data.image_cache_size={self.image_cache_size} must be >= 0")

    def use_tokenizer(self, tokenizer: TokenizerConfig) -> None:
        """Set by TrainConfig: the run's `tokenizer` group, which the webdataset source uses."""
        self._tokenizer = tokenizer

    def build(
        self,
        seed: int,
        rank: int,
        dp_world_size: int,
        micro_batch_size: int,
        global_batch_size: int,
        tokenizer: TokenizerConfig | None = None,
        sources_key: str = "data.sources",
    ):
        """The loader; `sources_key`: the config key its sources are named by in messages
        (eval.sources for the held-out reader, which is this config with those sources)."""
        tokenizer = tokenizer or getattr(self, "_tokenizer", None) or TokenizerConfig()
        if self.source == "synthetic_patterns":
            from mm_moe.data.loader import StepLoader
            from mm_moe.data.synthetic import SyntheticPatterns
            from mm_moe.tokenization.vocab import Vocab

            layout = Vocab.load(tokenizer.vocab) if tokenizer.vocab else None
            _warn_tokenizer_unread(tokenizer)
            source = SyntheticPatterns(self.synthetic, self.seq_len, seed, layout)
            return StepLoader(source, rank, dp_world_size, micro_batch_size, global_batch_size)

        from mm_moe.data.shards import check_tokens_vocab
        from mm_moe.data.webdataset_loader import WebDatasetLoader

        vocab = tokenizer.build().vocab
        spec = self.pipeline_spec(seed, tokenizer, vocab.pad, sources_key)
        for src in spec.sources:
            if src.format == "tokens":
                check_tokens_vocab(list(src.shards), tokenizer, vocab, src.name)
            if rank == 0:
                _warn_uneven_share(src, self.num_streams)
        return WebDatasetLoader(
            spec,
            vocab,
            self.num_workers,
            rank,
            dp_world_size,
            micro_batch_size,
            global_batch_size,
        )

    def vocab(self, tokenizer: TokenizerConfig | None = None):
        """The vocabulary this data source produces (what the model trains on)."""
        tokenizer = tokenizer or getattr(self, "_tokenizer", None) or TokenizerConfig()
        if self.source == "synthetic_patterns":
            from mm_moe.data.synthetic import SyntheticPatterns
            from mm_moe.tokenization.vocab import Vocab

            layout = Vocab.load(tokenizer.vocab) if tokenizer.vocab else None
            return SyntheticPatterns(self.synthetic, self.seq_len, 0, layout).vocab
        return tokenizer.build().vocab

    def pipeline_spec(
        self,
        seed: int,
        tokenizer: TokenizerConfig,
        pad_id: int | None = None,
        sources_key: str = "data.sources",
    ):
        """The picklable description of the webdataset pipeline (shards expanded here)."""
        from mm_moe.data.documents import DecodeOptions
        from mm_moe.data.shards import expand_urls
        from mm_moe.data.stream import PipelineSpec, SourceSpec

        if seed < 0:
            raise UserError(f"trainer.seed={seed} must be >= 0 for the webdataset source")
        if pad_id is None:
            pad_id = tokenizer.build().vocab.pad if self.whole_documents else 0
        sources = tuple(
            SourceSpec(
                i,
                tuple(expand_urls(src.urls, f"{sources_key}[{i}].urls")),
                src.format,
                src.weight,
                f"{sources_key}[{i}]",
            )
            for i, src in enumerate(self.sources)
        )
        return PipelineSpec(
            sources=sources,
            num_streams=self.num_streams,
            seed=seed,
            row_len=self.seq_len + 1,
            on_error=self.on_error,
            decode=DecodeOptions(
                self.min_image_side,
                self.max_aspect_ratio,
                self.pair_order,
                self.caption_first_prob,
                self.image_cache_size,
            ),
            tokenizer=tokenizer,
            whole_documents=self.whole_documents,
            pad_id=pad_id,
        )


def _warn_uneven_share(src, num_streams: int) -> None:
    """A source whose shards do not deal evenly over the streams: the streams with the smaller
    share read their samples more often (up to most/fewest times), which is said."""
    from mm_moe.data.shards import source_units, uneven_share

    share = uneven_share(len(src.shards), num_streams)
    if share is None or share[0] / share[1] <= 1.1:  # 1000 shards on 64 streams: 16 or 15
        return
    most, fewest = share
    parts = source_units(len(src.shards), num_streams)[0].parts
    logging.getLogger("mm_moe").warning(
        "%s: its %d shard(s)%s deal unevenly over data.num_streams=%d (%d or %d each): the "
        "samples of the smaller shares are read up to %.2gx as often as the others. A shard "
        "count that is a multiple of data.num_streams (or a num_streams dividing it) reads "
        "every sample equally",
        src.name,
        len(src.shards),
        f" ({parts} slices each)" if parts > 1 else "",
        num_streams,
        most,
        fewest,
        most / fewest,
    )


def tokenizer_unread(tokenizer: TokenizerConfig) -> str | None:
    """The synthetic source makes its own ids (the stand-in layout, or tokenizer.vocab's): a
    chosen tokenizer is not used, yet the checkpoint records it (sampling would then read it).
    What to say about it, or None."""
    unread = [
        f"tokenizer.{k}={getattr(tokenizer, k)}"
        for k, default in (("text", "utf8_bytes"), ("image", "grid_quantizer"), ("path", ""))
        if getattr(tokenizer, k) != default
    ]
    if not unread:
        return None
    return (
        f"data.source=synthetic_patterns makes its own token ids: {', '.join(unread)} "
        f"{'is' if len(unread) == 1 else 'are'} not used (and the checkpoint records it); to "
        "train with this tokenizer, give data.sources (data=webdataset, docs/data.md)"
    )


def _warn_tokenizer_unread(tokenizer: TokenizerConfig) -> None:
    if message := tokenizer_unread(tokenizer):
        logging.getLogger("mm_moe").warning(message)
