"""The interim synthetic_patterns source and the step loader."""

from __future__ import annotations

import numpy as np
import torch

from mm_moe.data.config import DataConfig
from mm_moe.modality import IMAGE, TEXT


def _loader(rank=0, world=1, micro=2, global_batch=8, seed=3):
    return DataConfig(seq_len=48).build(seed, rank, world, micro, global_batch)


def _cat(batches, name):
    return torch.cat([getattr(b, name) for b in batches])


def test_global_batch_is_independent_of_world_size_and_micro_batch():
    one = _loader(micro=8).micro_batches(5)
    parts = [b for r in range(4) for b in _loader(rank=r, world=4, micro=1).micro_batches(5)]
    for name in ("input_ids_BS", "target_ids_BS", "loss_mask_BS", "doc_ids_BS"):
        assert torch.equal(_cat(one, name), _cat(parts, name))


def test_steps_differ_and_repeat_deterministically():
    a, b = _loader(), _loader()
    assert torch.equal(a.next()[0].input_ids_BS, b.next()[0].input_ids_BS)
    assert not torch.equal(a.next()[0].input_ids_BS, _loader().micro_batches(0)[0].input_ids_BS)
    state = a.state_dict()
    c = _loader()
    c.load_state_dict(state)
    assert torch.equal(c.next()[0].input_ids_BS, a.next()[0].input_ids_BS)


def test_targets_masks_and_modalities_are_consistent():
    loader = _loader()
    vocab = loader.vocab
    b = loader.micro_batches(0)[0]
    assert torch.equal(b.input_ids_BS[:, 1:], b.target_ids_BS[:, :-1])
    is_code = (b.target_ids_BS >= vocab.image_offset) & (
        b.target_ids_BS < vocab.image_offset + vocab.image_size
    )
    assert torch.equal(b.target_modality_ids_BS == IMAGE, is_code)
    assert (b.modality_ids_BS[b.input_ids_BS == vocab.boi] == TEXT).all()
    # No loss across a document boundary; positions restart in each document.
    crossing = b.doc_ids_BS[:, 1:] != b.doc_ids_BS[:, :-1]
    assert not b.loss_mask_BS[:, :-1][crossing].any()
    starts = b.input_ids_BS == vocab.bos
    assert (b.position_ids_BS[starts] == 0).all()
    assert b.loss_mask_BS.float().mean() > 0.9


def test_images_follow_their_pattern():
    loader = _loader()
    src = loader.source
    tokens, modality, _, _ = src.row(0)
    side, k = src.cfg.image_side, src.cfg.image_codebook_size
    boi = np.flatnonzero(tokens == loader.vocab.boi)
    assert len(boi) > 0
    start = boi[0] + 1
    if start + side * side <= len(tokens):
        grid = (tokens[start : start + side * side] - loader.vocab.image_offset).reshape(side, side)
        row_step, col_step = (grid[1, 0] - grid[0, 0]) % k, (grid[0, 1] - grid[0, 0]) % k
        i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        assert np.array_equal(grid, (grid[0, 0] + row_step * i + col_step * j) % k)
        assert (modality[start : start + side * side] == IMAGE).all()


def test_a_tokenizer_the_synthetic_data_does_not_read_is_warned_about(caplog):
    """tokenizer=demo with the synthetic source trained on the stand-in ids without a word,
    while the checkpoint recorded the demo tokenizer."""
    from mm_moe.tokenization.config import TokenizerConfig

    cfg = DataConfig(seq_len=16)
    with caplog.at_level("WARNING"):
        cfg.build(0, 0, 1, 2, 2, tokenizer=TokenizerConfig())
    assert "makes its own token ids" not in caplog.text
    chosen = TokenizerConfig(text="sentencepiece", image="vq", path="tokenizers/demo")
    with caplog.at_level("WARNING"):
        cfg.build(0, 0, 1, 2, 2, tokenizer=chosen)
    assert (
        "makes its own token ids: tokenizer.text=sentencepiece, tokenizer.image=vq, "
        "tokenizer.path=tokenizers/demo are not used"
    ) in caplog.text


def test_a_resume_with_another_seed_or_global_batch_is_refused_naming_it():
    """The rows of a step depend on the seed, the global batch and the sequence length: an
    exact resume with others went on silently with other data (the webdataset source refused
    it); micro-batch and world size stay free."""
    import pytest

    from mm_moe.errors import UserError

    state = _loader().state_dict()
    _loader(micro=4).load_state_dict(state)
    _loader(rank=1, world=2).load_state_dict(state)
    with pytest.raises(UserError, match=r"trainer.seed: checkpoint 3, this run 5"):
        _loader(seed=5).load_state_dict(state)
    with pytest.raises(UserError, match=r"trainer.global_batch_size: checkpoint 8, this run 16"):
        _loader(global_batch=16).load_state_dict(state)
    _loader().load_state_dict({"step": 4})  # a checkpoint from before: not compared
