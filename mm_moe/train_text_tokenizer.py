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

import codecs
import logging
from pathlib import Path

from mm_moe.cli import hydra_entry
from mm_moe.errors import UserError
from mm_moe.tokenization.config import TrainTextConfig

log = logging.getLogger("mm_moe")
PROG = "mm_moe.tokenization.train_text"


def read_file(path: str, left_out: list[str] | None = None) -> list[str]:
    """The file's text: UTF-8 (its byte order mark dropped), or UTF-16 where a byte order mark
    says so (what Windows tools write); any other is left out with a warning, as the data
    builders leave it out, and added to `left_out`."""
    data = Path(path).read_bytes()
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return [data.decode("utf-16")]
        return [data.decode("utf-8-sig")]
    except UnicodeDecodeError:
        log.warning("files: %s is not UTF-8: left out", path)
        if left_out is not None:
            left_out.append(path)
        return []


def texts(cfg: TrainTextConfig, left_out: list[str] | None = None):
    from mm_moe.data.corpus import iter_texts

    total = 0
    streams = [iter_texts(cfg.sources)] if cfg.sources else []
    streams += [iter(read_file(f, left_out)) for f in cfg.files]
    for stream in streams:
        for text in stream:
            if cfg.max_chars:  # the last text cut to what is left: at most max_chars in all
                text = text[: cfg.max_chars - total]
            yield text
            total += len(text)
            if cfg.max_chars and total >= cfg.max_chars:
                return


def check_files(files: list[str]) -> None:
    for f in files:
        if not Path(f).is_file():
            what = "is a folder" if Path(f).is_dir() else "does not exist"
            raise UserError(
                f"files: {f} {what}; files=[...] takes plain UTF-8 text files "
                "(shards and folders of shards go in sources=[...])"
            )


def train(cfg: TrainTextConfig) -> Path:
    from mm_moe.tokenization.artifacts import refuse_to_replace
    from mm_moe.tokenization.sentencepiece_text import MODEL_FILE, train_sentencepiece

    refuse_to_replace(cfg.output, [MODEL_FILE], cfg.overwrite)
    check_files(cfg.files)
    given = {"sources": cfg.sources, "files": cfg.files}
    source = " ".join(f"{k}=[{','.join(v)}]" for k, v in given.items() if v)
    source += f" (its first max_chars={cfg.max_chars} characters)" if cfg.max_chars else ""
    left_out: list[str] = []
    try:
        path = train_sentencepiece(
            texts(cfg, left_out), Path(cfg.output), cfg.vocab_size, cfg.model_type, source=source
        )
    except UserError as exc:
        if left_out:  # the reason there was little or no text
            raise UserError(f"{exc}; left out as not UTF-8: {', '.join(left_out)}") from None
        raise
    log.info("sentencepiece %s (%d pieces) written to %s", cfg.model_type, cfg.vocab_size, path)
    return path


def main() -> None:
    hydra_entry(PROG, "train_text_tokenizer", TrainTextConfig, train)


if __name__ == "__main__":
    main()
