"""The stand-in tokenizers, the image preprocessing policy and the tokenizer config."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mm_moe.config import ConfigError, TrainConfig, from_dict
from mm_moe.tokenization.config import TokenizerConfig
from mm_moe.tokenization.image_preprocess import preprocess, resize_center_crop, to_rgb
from mm_moe.tokenization.interface import ImageTokenizer, TextTokenizer


def test_byte_tokenizer_round_trips_exactly():
    tok = TokenizerConfig().build().text
    assert isinstance(tok, TextTokenizer)
    text = "Grüße, 猫 and emoji 🙂\n"
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids) and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_grid_quantizer_codes_and_vocabulary_agree():
    toks = TokenizerConfig(image_size=16, grid=4, levels=4).build()
    image = toks.image
    assert isinstance(image, ImageTokenizer)
    assert (image.tokens_per_image, image.codebook_size) == (16, 64)
    assert toks.vocab.image_size == 64 and toks.vocab.text_size == 256
    # Left half pure red, right half pure blue: codes r*16 + g*4 + b.
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8, 0] = 255
    pixels[:, 8:, 2] = 255
    codes = image.encode(Image.fromarray(pixels)).reshape(4, 4)
    assert (codes[:, :2] == 48).all() and (codes[:, 2:] == 3).all()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8))
    codes = image.encode(noise)
    assert codes.shape == (16,) and codes.min() >= 0 and codes.max() < 64
    assert np.array_equal(codes, image.encode(noise))  # deterministic
    assert np.array_equal(image.encode(image.decode(codes)), codes)


def test_resize_shorter_side_then_center_crop():
    pixels = np.zeros((20, 60, 3), np.uint8)  # 60 wide, 20 high
    pixels[:, 20:40] = 255  # the centre third is white
    out = resize_center_crop(Image.fromarray(pixels), 10)
    assert out.size == (10, 10)
    kept = np.asarray(out)
    # Only the white centre survives the crop (bicubic blends the outermost columns a little).
    assert kept[:, 1:-1].min() == 255 and kept.min() > 200
    assert preprocess(Image.fromarray(pixels[:, :, 0], "L"), 8).mode == "RGB"


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "P", "LA", "L", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), np.uint8))
    image = base.convert("L").convert(mode) if mode in ("I;16", "I", "F") else base.convert(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_alpha_goes_over_white_and_16_bit_scales_by_full_range():
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    wide = np.array([[0, 65535], [32896, 65535]], dtype=np.uint16)
    assert Image.fromarray(wide).mode == "I;16"
    grey = np.asarray(to_rgb(Image.fromarray(wide)))[..., 0]
    assert grey.tolist() == [[0, 255], [128, 255]]


def test_tokenizer_config_is_a_validated_group():
    cfg = from_dict(TrainConfig, {"tokenizer": {"grid": 8, "image_size": 32}})
    assert cfg.tokenizer.grid == 8
    with pytest.raises(ConfigError, match="tokenizer.image_size=30 must be a multiple"):
        from_dict(TrainConfig, {"tokenizer": {"image_size": 30}})
    with pytest.raises(ConfigError, match="tokenizer.text='spm' is not valid"):
        from_dict(TrainConfig, {"tokenizer": {"text": "spm"}})
