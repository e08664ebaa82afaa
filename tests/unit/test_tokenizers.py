"""The trained tokenizers: exact text round trips, VQ reconstruction quality, vocabulary."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from mm_moe.tokenization.config import TokenizerConfig, unified_vocab
from mm_moe.tokenization.sentencepiece_text import SentencePieceTextTokenizer, train_sentencepiece
from mm_moe.tokenization.vocab import Vocab

ROUND_TRIP = [
    "a handwritten digit 7",
    "Hello,  world!\n\n\tIndented   text with trailing spaces   ",
    "ünïcödé — 漢字 и кириллица 🙂🚀",
    "control \x01\x7f chars and a NUL-free tail",
    "    leading spaces",
    "",
    "x" * 3000,
    # a literal U+2581 (sparklines, logs) was read as a space: "x y" and "x▁y" collided
    "sparkline ▁▂▃▅▇ and x▁y, x y, ▁▁ at the ends ▁",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)][:200]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("sp"), vocab_size=600)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_round_trips_exactly(sp_model, text):
    tok = SentencePieceTextTokenizer(sp_model)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_a_tokenizer_of_text_without_spaces_round_trips_spaces(tmp_path):
    """Trained on Chinese (no spaces), sentencepiece had no piece for a space: spaces came back
    as "▁". The space's piece is kept whatever the text."""
    import random

    rng = random.Random(0)
    lines = ["".join(chr(0x4E00 + rng.randrange(400)) for _ in range(30)) for _ in range(3000)]
    tok = SentencePieceTextTokenizer(train_sentencepiece(lines, tmp_path, vocab_size=700))
    for text in ("a b", "一 丁", "x▁y and x y", "  two  spaces  "):
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_training_is_deterministic(sp_model, tmp_path):
    from pydoc_data.topics import topics

    again = train_sentencepiece([topics[k] for k in sorted(topics)][:200], tmp_path, 600)
    assert again.read_bytes() == sp_model.read_bytes()


def test_unified_vocabulary_layout(sp_model, tmp_path):
    tok = SentencePieceTextTokenizer(sp_model)
    vocab = unified_vocab(tok, codebook_size=256)
    specials = [vocab.bos, vocab.eos, vocab.pad, vocab.boi, vocab.eoi]
    assert len(set(specials)) == 5 and max(specials) < tok.vocab_size
    assert vocab.image_offset == tok.vocab_size and vocab.size == tok.vocab_size + 256
    assert tok.sp.id_to_piece(vocab.boi) == "<boi>" and tok.sp.id_to_piece(vocab.eoi) == "<eoi>"
    # Text never produces image ids, and the specials are not produced by plain text.
    ids = tok.encode("<boi> is just text here")
    assert max(ids) < vocab.image_offset
    vocab.save(tmp_path / "vocab.yaml")
    assert Vocab.load(tmp_path / "vocab.yaml") == vocab
    with pytest.raises(ValueError, match="special token"):
        replace(vocab, eoi=vocab.image_offset + 3)


def test_tokenizer_config_needs_a_path():
    with pytest.raises(ValueError, match="tokenizer.path"):
        TokenizerConfig(text="sentencepiece", image="vq")


@pytest.fixture(scope="module")
def trained_vq(tmp_path_factory):
    from data_pipelines.demo_corpus import mnist
    from mm_moe.tokenization.config import VQConfig
    from mm_moe.tokenization.vq.tokenizer import save
    from mm_moe.tokenization.vq.train import evaluate, images_to_tensor, train_vq

    x, _ = mnist()
    order = np.random.default_rng(0).permutation(len(x))
    images = [Image.fromarray(x[i]) for i in order[:1300]]
    train_x = images_to_tensor(images[:1000], 28)
    held_x = images_to_tensor(images[1000:], 28)
    cfg = VQConfig(resolution=28, downsample=4, codebook_size=128, code_dim=16, channels=32)
    torch.set_num_threads(2)
    model = train_vq(train_x, cfg, steps=150, batch_size=32, lr=3e-3, seed=0)
    metrics = {"heldout": evaluate(model, held_x)}
    out = tmp_path_factory.mktemp("vq")
    save(model, out, metrics)
    return out, images[1000:], metrics


# Floors for this 150-step test run on 1,000 digits (make train's tokenizer, trained longer on
# the whole corpus, reaches more; see README).
PSNR_FLOOR_DB = 17.0
USAGE_FLOOR = 0.5


def test_vq_heldout_psnr_and_codebook_usage(trained_vq):
    _, _, metrics = trained_vq
    assert metrics["heldout"]["psnr_db"] > PSNR_FLOOR_DB, metrics
    assert metrics["heldout"]["codebook_usage"] > USAGE_FLOOR, metrics


def test_vq_tokenizer_encodes_and_decodes(trained_vq):
    from mm_moe.tokenization.vq.model import psnr
    from mm_moe.tokenization.vq.tokenizer import VQImageTokenizer, image_to_tensor

    path, held, _ = trained_vq
    tok = VQImageTokenizer(path)
    assert tok.tokens_per_image == 49 and tok.codebook_size == 128
    image = held[0]
    codes = tok.encode(image)
    assert codes.shape == (49,) and codes.min() >= 0 and codes.max() < 128
    assert np.array_equal(codes, tok.encode(image))  # deterministic
    recon = tok.decode(codes)
    assert recon.size == (28, 28) and recon.mode == "RGB"
    assert psnr(image_to_tensor(recon, 28), image_to_tensor(image, 28)) > PSNR_FLOOR_DB - 3
    # Any size and mode goes through the preprocessing policy first.
    assert tok.encode(image.convert("RGBA").resize((56, 70))).shape == (49,)
    with pytest.raises(ValueError, match="49 codes"):
        tok.decode(codes[:10])


def test_missing_artifacts_fail_clearly(tmp_path):
    from mm_moe.tokenization.vq.tokenizer import VQImageTokenizer

    with pytest.raises(ValueError, match="train_image"):
        VQImageTokenizer(tmp_path)
    with pytest.raises(ValueError, match="train_text"):
        SentencePieceTextTokenizer(tmp_path / "text.model")


# Special-token strings a document may hold as text (a page about HTML, tokenizers or Chameleon).
SPECIAL_STRINGS = "see </s> and <s>, <pad>, <boi>x<eoi> or <racm3:break><eoss> <boi><boi>"


def test_sentencepiece_encodes_special_token_strings_as_text(sp_model, tmp_path):
    tok = SentencePieceTextTokenizer(sp_model)
    specials = {tok.pad, tok.bos, tok.eos, tok.boi, tok.eoi, tok.sp.unk_id()}
    for text in (SPECIAL_STRINGS, "<boi>", "a<eoi>", SPECIAL_STRINGS * 3):
        ids = tok.encode(text)
        assert not specials & set(ids), [tok.sp.id_to_piece(i) for i in ids]
        assert tok.decode(ids) == text
    # a tokenizer.model read by tokenizer.text=hf does the same
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    hf = TokenizerConfig(text="hf", path=str(tmp_path)).build().text
    ids = hf.encode(SPECIAL_STRINGS)
    assert not specials & set(ids) and hf.decode(ids) == SPECIAL_STRINGS


def test_hf_tokenizer_encodes_special_token_strings_as_text(tmp_path):
    from tests.hf_fixtures import make_tokenizer

    source = make_tokenizer(tmp_path, 320, image_tokens=True)  # Chameleon's specials added
    special_ids = {i for i, t in source.get_added_tokens_decoder().items() if t.special}
    assert len(special_ids) > 4
    tok = TokenizerConfig(text="hf", path=str(tmp_path)).build().text
    ids = tok.encode(SPECIAL_STRINGS)
    assert not special_ids & set(ids)
    assert tok.decode(ids) == SPECIAL_STRINGS


def test_image_token_ids_takes_what_a_notebook_holds(tmp_path):
    """A PIL image, a path to one, or an H x W x C uint8 array give the same ids; anything
    else, an unreadable file and an image without pixels are UserErrors saying what is taken
    (they were AttributeErrors and a ZeroDivisionError)."""
    from mm_moe.errors import UserError
    from mm_moe.tokenization.config import TokenizerConfig

    tok = TokenizerConfig().build()
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    image.save(tmp_path / "red.png")
    ids = tok.image_token_ids(image)
    assert np.array_equal(tok.image_token_ids(tmp_path / "red.png"), ids)
    assert np.array_equal(tok.image_token_ids(str(tmp_path / "red.png")), ids)
    assert np.array_equal(tok.image_token_ids(np.asarray(image)), ids)
    for bad, says in [
        (Image.new("RGB", (0, 0)), "0x0: it has no pixels"),
        (3.0, "not a float"),
        (tmp_path / "missing.png", "missing.png cannot be read"),
        (np.zeros((2, 2, 7), np.uint8), r"shape \(2, 2, 7\)"),
    ]:
        with pytest.raises(UserError, match=says):
            tok.image_token_ids(bad)


def test_a_forward_names_the_input_shape_it_takes():
    """input_ids of one dimension, or with no token, are a UserError naming the shape
    ([batch, sequence]), not an IndexError or a reshape error from deep inside."""
    from mm_moe.errors import UserError
    from mm_moe.model.config import ModelConfig

    model = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1).build()
    assert model(torch.arange(5)[None]).logits.shape == (1, 5, 64)
    for ids, shape in [
        (torch.arange(5), r"\(5,\)"),
        (torch.zeros(1, 0, dtype=torch.long), r"\(1, 0\)"),
    ]:
        with pytest.raises(UserError, match=rf"input_ids must be \[batch, sequence\].*{shape}"):
            model(ids)
    # the per-token arguments: input_ids' shape, and integer ids or a bool mask (their
    # shapes and dtypes only: no host sync). A dense model ignored them before.
    ids = torch.arange(5)[None]
    for kwargs, message in [
        (
            {"modality_ids": torch.zeros(5, dtype=torch.long)},
            r"modality_ids must have .*\(1, 5\), got \(5,\)",
        ),
        ({"doc_ids": torch.zeros(1, 4, dtype=torch.long)}, r"doc_ids must have .*got \(1, 4\)"),
        (
            {"position_ids": torch.zeros(1, 5)},
            r"position_ids must be an integer dtype.*torch.float32",
        ),
        ({"modality_ids": torch.zeros(1, 5)}, r"modality_ids must be an integer dtype"),
        ({"token_mask": torch.ones(1, 5)}, r"token_mask must be bool, got torch.float32"),
    ]:
        with pytest.raises(UserError, match=message):
            model(ids, **kwargs)
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert model(ids, torch.zeros_like(ids), token_mask=mask).logits.shape == (1, 5, 64)
