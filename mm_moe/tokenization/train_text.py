"""Train the sentencepiece text tokenizer: `python -m mm_moe.tokenization.train_text`.

    python -m mm_moe.tokenization.train_text sources=[data/demo/text,data/demo/pairs] \
        output=tokenizers/demo vocab_size=4096

Reads captions, text samples and interleaved documents' text from shards and/or plain text
files (`files`), and writes OUTPUT/text.model. Configured with Hydra
(configs/train_text_tokenizer.yaml), validated against `TrainTextConfig`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mm_moe.cli import hydra_entry
from mm_moe.errors import UserError

log = logging.getLogger("mm_moe")


@dataclass
class TrainTextConfig:
    output: str = "tokenizers/demo"
    # Shard patterns, folders or files (see data.sources urls) to read text from.
    sources: list[str] = field(default_factory=list)
    # Plain UTF-8 text files, one or more documents each.
    files: list[str] = field(default_factory=list)
    vocab_size: int = 4096
    model_type: Literal["bpe", "unigram"] = "bpe"
    # Read at most this many characters (0: all).
    max_chars: int = 0

    def __post_init__(self) -> None:
        if not self.sources and not self.files:
            raise UserError("give text to train on: sources=[SHARDS...] and/or files=[...]")
        if self.vocab_size < 300:
            raise UserError(
                f"vocab_size={self.vocab_size} must be at least 300 "
                "(256 byte-fallback pieces, specials, and merges)"
            )


def texts(cfg: TrainTextConfig):
    from mm_moe.data.corpus import iter_texts

    total = 0
    streams = [iter_texts(cfg.sources)] if cfg.sources else []
    streams += [iter([Path(f).read_text(encoding="utf-8")]) for f in cfg.files]
    for stream in streams:
        for text in stream:
            yield text
            total += len(text)
            if cfg.max_chars and total >= cfg.max_chars:
                return


def train(cfg: TrainTextConfig) -> Path:
    from mm_moe.tokenization.sentencepiece_text import train_sentencepiece

    path = train_sentencepiece(texts(cfg), Path(cfg.output), cfg.vocab_size, cfg.model_type)
    log.info("sentencepiece %s (%d pieces) written to %s", cfg.model_type, cfg.vocab_size, path)
    return path


if __name__ == "__main__":
    hydra_entry("mm_moe.tokenization.train_text", "train_text_tokenizer", TrainTextConfig, train)
