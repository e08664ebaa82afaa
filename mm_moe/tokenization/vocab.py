"""The unified vocabulary: where text ids, image codes and special tokens live.

Data, model and sampling all read the same `Vocab`, so an id means the same thing everywhere.
Image code c is id `image_offset + c` (this project's layout: text, specials, then the
codebook), or `image_ids[c]` where a published model put its image tokens elsewhere (Chameleon
keeps them inside its text vocabulary, in an order of its own). Every id that is neither an
image code nor one of the five specials is text; boi and eoi are text-modality tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from mm_moe.errors import UserError
from mm_moe.modality import IMAGE, TEXT


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
    # The id of each image code when they are not `image_offset + code` (empty: they are).
    image_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.image_ids:
            object.__setattr__(self, "image_ids", tuple(int(i) for i in self.image_ids))
        specials = {"bos": self.bos, "eos": self.eos, "pad": self.pad, "boi": self.boi}
        specials["eoi"] = self.eoi
        if len(set(specials.values())) != len(specials):
            raise UserError(f"special token ids must be distinct, got {specials}")
        image = set(self.image_ids) if self.image_ids else None
        if image is not None:
            if len(self.image_ids) != self.image_size or len(image) != self.image_size:
                raise UserError(
                    f"image_ids must hold {self.image_size} distinct ids, got "
                    f"{len(self.image_ids)} ({len(image)} distinct)"
                )
            if min(image) < 0 or max(image) >= self.size:
                raise UserError(f"image_ids must lie in [0, {self.size})")
        elif self.image_offset < self.text_size or self.image_offset + self.image_size > self.size:
            raise UserError("image codes must follow the text ids and fit in the vocabulary")
        for name, idx in specials.items():
            if not 0 <= idx < self.size or self.is_image(np.array([idx]))[0]:
                raise UserError(
                    f"special token {name}={idx} must lie in [0, {self.size}) "
                    "outside the image codes"
                )

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

    # ---- image codes <-> ids ----
    @cached_property
    def _table(self) -> np.ndarray:
        if self.image_ids:
            return np.asarray(self.image_ids, dtype=np.int64)
        return np.arange(self.image_offset, self.image_offset + self.image_size, dtype=np.int64)

    @cached_property
    def _code_of_id(self) -> np.ndarray:
        """[size] code of each id, -1 where the id is not an image code."""
        codes = np.full(self.size, -1, dtype=np.int64)
        codes[self._table] = np.arange(self.image_size)
        return codes

    def image_token_ids(self, codes) -> np.ndarray:
        """Vocabulary ids of image codes (any int array)."""
        return self._table[np.asarray(codes, dtype=np.int64)]

    def image_codes(self, ids) -> np.ndarray:
        """Image codes of vocabulary ids (-1 for ids that are not image codes)."""
        return self._code_of_id[np.asarray(ids, dtype=np.int64)]

    def is_image(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self.size)
        return inside & (self._code_of_id[np.clip(ids, 0, self.size - 1)] >= 0)

    def modality_of(self, ids) -> np.ndarray:
        """TEXT or IMAGE per id (uint8)."""
        return np.where(self.is_image(ids), IMAGE, TEXT).astype(np.uint8)

    def image_id_mask(self):
        """[size] bool torch tensor: which ids are image codes (for logits masks)."""
        import torch

        return torch.from_numpy(self._code_of_id >= 0)

    # ---- files ----
    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            return cls(**yaml.safe_load(Path(path).read_text()))
        except (TypeError, ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(
                f"invalid vocabulary file {path} ({type(exc).__name__}: {first}): damaged or not "
                "a vocab.yaml; copy it again from where it was written"
            ) from None

    def save(self, path: str | Path) -> None:
        fields = asdict(self)
        if not self.image_ids:
            fields.pop("image_ids")  # this project's layout: the files stay as they were
        else:
            fields["image_ids"] = list(self.image_ids)
        Path(path).write_text(yaml.safe_dump(fields, sort_keys=False))
