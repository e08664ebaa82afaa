"""The unified vocabulary: where text ids, image codes and special tokens live.

Data, model and sampling all read the same `Vocab`, so an id means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from mm_moe.errors import UserError


@dataclass(frozen=True)
class Vocab:
    text_size: int
    image_offset: int
    image_size: int
    bos: int
    eos: int
    pad: int
    boi: int  # begin of image
    eoi: int  # end of image
    size: int

    def __post_init__(self) -> None:
        specials = {
            "bos": self.bos,
            "eos": self.eos,
            "pad": self.pad,
            "boi": self.boi,
            "eoi": self.eoi,
        }
        image_ids = range(self.image_offset, self.image_offset + self.image_size)
        if len(set(specials.values())) != len(specials):
            raise UserError(f"special token ids must be distinct, got {specials}")
        for name, idx in specials.items():
            if not 0 <= idx < self.size or idx in image_ids:
                raise UserError(
                    f"special token {name}={idx} must lie in [0, {self.size}) "
                    "outside the image codes"
                )
        if self.image_offset < self.text_size or self.image_offset + self.image_size > self.size:
            raise UserError("image codes must follow the text ids and fit in the vocabulary")

    @classmethod
    def from_sizes(cls, text_size: int, image_size: int) -> Vocab:
        """Text ids first, then the five special tokens, then the image codebook."""
        return cls(
            text_size=text_size,
            image_offset=text_size + 5,
            image_size=image_size,
            bos=text_size,
            eos=text_size + 1,
            pad=text_size + 2,
            boi=text_size + 3,
            eoi=text_size + 4,
            size=text_size + 5 + image_size,
        )

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            return cls(**yaml.safe_load(Path(path).read_text()))
        except (TypeError, ValueError) as exc:
            raise UserError(f"invalid vocabulary file {path}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))
