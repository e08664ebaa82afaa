"""The sentencepiece text tokenizer: training from text, and encoding that round-trips exactly.

Exact round trips come from byte fallback (any UTF-8 input is representable), the identity
normalization and no dummy prefix or whitespace folding: decode(encode(s)) == s for every s.
The special tokens live in the sentencepiece model itself: pad 0, unk 1, bos 2, eos 3, and the
user-defined <boi> and <eoi> (begin and end of image) right after them.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from mm_moe.errors import UserError
from mm_moe.tokenization.config import MIN_VOCAB_SIZE

BOI, EOI = "<boi>", "<eoi>"
SPACE_PIECE = "\u2581"  # how sentencepiece writes a space
log = logging.getLogger("mm_moe")
MODEL_FILE = "text.model"


def train_sentencepiece(
    texts: Iterable[str],
    out_dir: Path,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentence_length: int = 16384,
    source: str = "the text",
) -> Path:
    """Train on `texts` (one sample each; newlines split sentences) and write text.model.
    A text that cannot make `vocab_size` pieces, or no text at all, is a UserError naming
    `source` (what the texts came from) and the vocab_size that would do. Lines longer than
    `max_sentence_length` bytes, which sentencepiece would skip without a word (paragraphs
    of web text, documents without newlines), are cut into sentences that fit."""
    sentences, long_lines = [0], [0]  # how many the trainer was given: none is the user's mistake

    def counted():
        for text in texts:
            for line in text.splitlines():
                if not line.strip():
                    continue
                parts = list(fitting(line, max_sentence_length))
                long_lines[0] += len(parts) > 1
                sentences[0] += len(parts)
                yield from parts

    proto = io.BytesIO()
    try:
        _train(counted(), proto, vocab_size, model_type, max_sentence_length)
    except RuntimeError as exc:
        raise _explained(exc, sentences[0], vocab_size, max_sentence_length, source) from None
    if long_lines[0]:
        log.info(
            "%d line(s) of %s longer than %d bytes were cut into sentences that fit",
            long_lines[0],
            source,
            max_sentence_length,
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # only once there is a model to write
    path = Path(out_dir) / MODEL_FILE
    path.write_bytes(proto.getvalue())
    return path


def fitting(line: str, max_bytes: int) -> Iterator[str]:
    """`line` in pieces of at most `max_bytes` UTF-8 bytes, each cut after the last
    whitespace that fits (or, in a run without whitespace, at the last whole character); one
    pass over the bytes, however long the line."""
    data = line.encode()
    start = 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        while (data[end] & 0xC0) == 0x80:  # a continuation byte: back to the character's start
            end -= 1
        space = max(data.rfind(b" ", start, end), data.rfind(b"\t", start, end))
        cut = space + 1 if space > start else end
        yield data[start:cut].decode()
        start = cut
    if start < len(data):
        yield data[start:].decode()


def _train(sentences, proto, vocab_size: int, model_type: str, max_sentence_length: int):
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=proto,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=[BOI, EOI],
        # The space's piece (sentencepiece writes spaces as U+2581) even where the text has no
        # space (Chinese, Japanese): without it a space falls back to U+2581's bytes, which
        # decode as "▁", not " ".
        required_chars=SPACE_PIECE,
        max_sentence_length=max_sentence_length,
        num_threads=1,
        minloglevel=2,
    )


# Sentencepiece's own checks (trainer_interface.cc), as it words them.
_TOO_SMALL = re.compile(r"smaller than required_chars\. \d+ vs (\d+)")
_TOO_LARGE = re.compile(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)")


def _explained(exc: RuntimeError, sentences: int, vocab_size: int, max_len: int, source: str):
    """Sentencepiece's refusal of the user's text or vocab_size as a one-line UserError;
    anything else stays the RuntimeError it is."""
    message = str(exc)
    if not sentences:
        return UserError(f"no text to train on in {source}: no non-blank line was read from it")
    if "sentences_.empty()" in message:
        return UserError(
            f"no text to train on in {source}: every line is longer than {max_len} bytes"
        )
    if small := _TOO_SMALL.search(message):
        return UserError(
            f"vocab_size={vocab_size} is too small for {source}: it needs at least "
            f"{small.group(1)} (256 byte pieces, 6 special pieces and one per character "
            "sentencepiece keeps: those covering 99.95% of the text); set vocab_size to that "
            "or more"
        )
    if (large := _TOO_LARGE.search(message)) and int(large.group(1)) < MIN_VOCAB_SIZE:
        return UserError(
            f"{source} is too little text for a tokenizer: it makes at most {large.group(1)} "
            f"pieces, and vocab_size must be at least {MIN_VOCAB_SIZE} (256 byte pieces, 6 "
            "special pieces and the text's own); give more text (model_type=bpe makes more "
            "pieces of a short text than unigram)"
        )
    if large:
        return UserError(
            f"vocab_size={vocab_size} is more than {source} supports: it makes at most "
            f"{large.group(1)} pieces; set vocab_size to that or less, or give more text"
        )
    return exc


def user_defined_symbols(sp: spm.SentencePieceProcessor) -> list[str]:
    """The model's user-defined pieces (the processor has no is_user_defined: read the proto,
    whose module ships with sentencepiece; protobuf comes with wandb)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return [p.piece for p in proto.pieces if p.type == user_defined]


class PlainEncoder:
    """Sentencepiece encoding of raw text as plain text. Sentencepiece matches user-defined
    symbols (<boi>, <eoi>) wherever their strings occur in the input, so a document that
    merely mentions "<boi>" would get a begin-of-image id. Each occurrence is broken before
    encoding: its first character is encoded on its own, the rest with what follows, so no
    piece spans the whole symbol; decoding gives the same string back. (Control symbols such
    as <s> and </s> are never produced from text by sentencepiece itself.)"""

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp = sp
        # A literal U+2581 in the text would be read as a space: its UTF-8 bytes as byte
        # pieces instead, which decode as the character itself.
        self._literal_space_piece = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_PIECE.encode()]
        symbols = user_defined_symbols(sp)
        longest_first = sorted((s for s in symbols if len(s) > 1), key=len, reverse=True)
        self._pattern = (
            re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        )

    def encode(self, text: str) -> list[int]:
        if SPACE_PIECE not in text:
            return self._encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_PIECE)):
            ids += self._literal_space_piece if i else []
            ids += self._encode(part) if part else []
        return ids

    def _encode(self, text: str) -> list[int]:
        if self._pattern is None:
            return self.sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._pattern.finditer(text):
            ids += self.sp.encode(text[start : match.start() + 1])
            start = match.start() + 1
        return ids + (self.sp.encode(text[start:]) if start < len(text) else [])


class SentencePieceTextTokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise UserError(
                f"sentencepiece model {path} not found: set tokenizer.path to the folder "
                "that holds text.model (the demo's, tokenizers/demo, is built by `make "
                "train`), or train one with `python -m mm_moe.tokenization.train_text`"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise UserError(
                f"{path} is not a readable sentencepiece model ({str(exc).strip()[:200]}): "
                "an interrupted copy or another file; copy it again from where it was trained, "
                "or train it again with `python -m mm_moe.tokenization.train_text`"
            ) from None
        self.vocab_size = self.sp.get_piece_size()
        self.pad, self.bos, self.eos = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        self.boi, self.eoi = self.sp.piece_to_id(BOI), self.sp.piece_to_id(EOI)
        if (
            min(self.pad, self.bos, self.eos, self.boi, self.eoi) < 0
            or self.boi == self.sp.unk_id()
        ):
            raise UserError(
                f"{path} lacks the special tokens (pad, bos, eos, {BOI}, {EOI}); "
                "retrain it with mm_moe.tokenization.train_text"
            )

        self._plain = PlainEncoder(self.sp)

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))
