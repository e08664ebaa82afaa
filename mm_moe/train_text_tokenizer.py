"""Train the sentencepiece text tokenizer: `python -m mm_moe.tokenization.train_text`.

    python -m mm_moe.tokenization.train_text sources=[data/demo/text,data/demo/pairs] \\
        output=tokenizers/demo vocab_size=4096

Reads captions, text samples and interleaved documents' text from shards and/or plain text
files (`files`), and writes OUTPUT/text.model. Configured with Hydra
(configs/train_text_tokenizer.yaml), validated against `TrainTextConfig`
(mm_moe/tokenization/config.py). The command's name is mm_moe/tokenization/train_text.py,
which runs this entry point.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mm_moe.cli import hydra_entry
from mm_moe.tokenization.config import TrainTextConfig

log = logging.getLogger("mm_moe")
PROG = "mm_moe.tokenization.train_text"


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


def main() -> None:
    hydra_entry(PROG, "train_text_tokenizer", TrainTextConfig, train)


if __name__ == "__main__":
    main()
