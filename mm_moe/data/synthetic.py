"""`synthetic_patterns`: an in-process token source with structure both modalities can learn.

An interim source for tiny experiments and tests, until webdataset shards are available.
Every packed row is a pure function of (seed, row index), so the stream is deterministic and
independent of world size. The rows are documents of
- text from a fixed random "language": every word has two possible successors, so a model
  can learn bigram statistics down to ln 2 nats per token;
- images: a square grid of codes following a linear pattern code[i, j] = (a*i + b*j + c) mod K,
  preceded by a caption whose two words name (a, b), so a model can learn text->image
  conditioning and the 2-D pattern.
"""

from __future__ import annotations

import numpy as np

from mm_moe.data.config import SYNTHETIC_SLOPES as _SLOPES
from mm_moe.data.config import SyntheticPatternsConfig
from mm_moe.errors import UserError
from mm_moe.modality import IMAGE, TEXT
from mm_moe.tokenization.vocab import Vocab

_LANGUAGE_SEED = 1234  # fixed: the "language" does not change with the training seed


class SyntheticPatterns:
    """`layout`, when given (a published model's vocabulary, tokenizer.vocab), is where the
    words and codes live: word w is the layout's w-th text id, code c its c-th image code."""

    def __init__(self, cfg: SyntheticPatternsConfig, seq_len: int, seed: int, layout=None):
        self.cfg, self.seq_len, self.seed = cfg, seq_len, seed
        self.vocab = layout or Vocab.from_sizes(cfg.text_vocab_size, cfg.image_codebook_size)
        self.word_ids = np.arange(cfg.text_vocab_size)
        if layout is not None:
            specials = [layout.bos, layout.eos, layout.pad, layout.boi, layout.eoi]
            text = np.flatnonzero(~layout.is_image(np.arange(layout.size)))
            self.word_ids = text[~np.isin(text, specials)][: cfg.text_vocab_size]
            if layout.image_size < cfg.image_codebook_size or len(self.word_ids) < 2 * len(_SLOPES):
                raise UserError(
                    f"data.synthetic needs {cfg.image_codebook_size} image codes and at least "
                    f"{2 * len(_SLOPES)} text ids; tokenizer.vocab has {layout.image_size} and "
                    f"{len(self.word_ids)}"
                )
        words = len(self.word_ids)  # the language's size: text_vocab_size, or what fits
        lang = np.random.default_rng(_LANGUAGE_SEED)
        self.successors_V2 = lang.integers(0, words, size=(words, 2))
        # The caption words naming the slopes a and b.
        self.slope_words = lang.choice(words, size=(2, len(_SLOPES)), replace=False)

    def _text(self, rng: np.random.Generator) -> list[int]:
        length = 1 + int(rng.geometric(1 / self.cfg.mean_text_len))
        words = [int(rng.integers(len(self.word_ids)))]
        choices = rng.integers(0, 2, size=length - 1)
        for c in choices:
            words.append(int(self.successors_V2[words[-1], c]))
        return words

    def _image(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        side, k = self.cfg.image_side, self.cfg.image_codebook_size
        ia, ib = rng.integers(len(_SLOPES), size=2)
        c = int(rng.integers(k))
        i_SS, j_SS = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        codes_SS = (_SLOPES[ia] * i_SS + _SLOPES[ib] * j_SS + c) % k
        codes = self.vocab.image_token_ids(codes_SS.ravel())
        caption = [int(self.word_ids[self.slope_words[0, ia]])]
        caption.append(int(self.word_ids[self.slope_words[1, ib]]))
        image = [self.vocab.boi, *codes.tolist(), self.vocab.eoi]
        modality = [TEXT] + [IMAGE] * len(codes) + [TEXT]
        return caption + image, [TEXT] * len(caption) + modality

    def _document(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        tokens, modality = [self.vocab.bos], [TEXT]
        if rng.random() < self.cfg.image_prob:
            t, m = self._image(rng)
            tokens += t
            modality += m
        text = self.word_ids[self._text(rng)].tolist()
        return tokens + text + [self.vocab.eos], modality + [TEXT] * (len(text) + 1)

    def row(self, index: int) -> tuple[np.ndarray, ...]:
        """Packed row `index`: tokens, modality, doc and position ids of length seq_len + 1."""
        rng = np.random.default_rng([self.seed, index])
        length = self.seq_len + 1
        tokens, modality, doc, pos = [], [], [], []
        d = 0
        while len(tokens) < length:
            t, m = self._document(rng)
            tokens += t
            modality += m
            doc += [d] * len(t)
            pos += range(len(t))
            d += 1
        arrays = (tokens, modality, doc, pos)
        return tuple(np.asarray(a[:length], dtype=np.int64) for a in arrays)
