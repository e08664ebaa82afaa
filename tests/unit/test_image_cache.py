"""data.image_cache_size: a worker encodes an image once, and the documents are the same."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mm_moe.data.config import DataConfig
from mm_moe.data.documents import DecodeOptions, DocumentBuilder
from mm_moe.data.tar_reader import RawSample
from mm_moe.errors import UserError
from mm_moe.tokenization.config import TokenizerConfig
from tests.data_shards import image_bytes

TOKENIZER = TokenizerConfig(image_size=16, grid=4, levels=4)


class CountingImageTokenizer:
    """Wraps the image tokenizer from outside, counting the encodes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.tokens_per_image = inner.tokens_per_image
        self.codebook_size = inner.codebook_size

    def encode(self, image):
        self.calls += 1
        return self.inner.encode(image)


def _builder(cache_size: int) -> tuple[DocumentBuilder, CountingImageTokenizer]:
    options = DecodeOptions(16, 4.0, "caption_first", 0.5, cache_size)
    tokenizers = TOKENIZER.build()
    counting = CountingImageTokenizer(tokenizers.image)
    return DocumentBuilder(replace(tokenizers, image=counting), options), counting


def _pair(key: str, seed: int) -> RawSample:
    return RawSample(key, 0, {"png": image_bytes(seed), "txt": f"caption {seed}".encode()})


def test_cached_documents_equal_uncached_and_the_cache_is_lru():
    order = [0, 1, 0, 2, 1, 0, 3, 0]  # image seeds, read in this order
    cached, counted = _builder(cache_size=2)
    plain, plain_counted = _builder(cache_size=0)
    rng = np.random.default_rng(0)
    for i, seed in enumerate(order):
        got = cached.build("pairs", _pair(f"k{i}", seed), rng)
        want = plain.build("pairs", _pair(f"k{i}", seed), rng)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.modality, want.modality)
    assert plain_counted.calls == len(order)
    # LRU of 2: 0, 1 miss; 0 hit; 2 miss (evicts 1); 1 miss (evicts 0); 0 miss (evicts 2);
    # 3 miss (evicts 1); 0 hit.
    assert counted.calls == 6


def test_image_cache_size_must_not_be_negative():
    with pytest.raises(UserError, match="data.image_cache_size"):
        DataConfig(image_cache_size=-1)
