"""Export to Hugging Face, then import that folder back (`source_format=hf`): the unified
vocabulary (text ids, specials, image codes) keeps its layout and every id its embedding row;
verify checks the layout when the source records it; qwen3 (QK-norm) exports import back, a
Mixtral export is refused with the way back named."""

from __future__ import annotations

import pytest
import torch

import mm_moe
from mm_moe.errors import UserError
from mm_moe.export import ExportConfig
from mm_moe.export import run as export
from mm_moe.tokenization.vocab import Vocab
from mm_moe.upcycle_command import run as upcycle
from tests.unit.test_export import MIXTRAL, NO_QK_NORM, _checkpoint

MOMA_TC = ["moe=moma_4t4i_tc"]


def _exported(tmp_path, model: dict, moe: dict | None = None):
    source = _checkpoint(tmp_path / "src", moe or {}, model)
    out = tmp_path / "hf"
    return source, out, export(ExportConfig(str(source), str(out)))


@pytest.mark.parametrize("model, kind", [(NO_QK_NORM, "llama"), ({}, "qwen3")])
def test_export_then_import_keeps_the_vocabulary_and_its_rows(tmp_path, capsys, model, kind):
    source, hf, got_kind = _exported(tmp_path, model)
    assert got_kind == kind
    up = tmp_path / "up"
    code = upcycle([f"source={hf}", "source_format=hf", f"out={up}", "verify=true", *MOMA_TC])
    printed = capsys.readouterr().out
    assert code == 0, printed
    want = Vocab.load(source / "vocab.yaml")
    assert Vocab.load(up / "vocab.yaml") == want  # the same layout, nothing appended
    assert mm_moe.load_tokenizers(up).vocab == want
    ours, src = mm_moe.load_pretrained(up), mm_moe.load_pretrained(source)
    assert ours.cfg.vocab_size == src.cfg.vocab_size
    assert torch.equal(ours.image_id_mask_V, src.image_id_mask_V)
    image_ids = torch.from_numpy(want.image_token_ids(range(want.image_size)))
    specials = torch.tensor([want.bos, want.eos, want.pad, want.boi, want.eoi])
    for ids in (image_ids, specials):  # image codes and specials keep their trained rows
        assert torch.equal(ours.embed.weight[ids], src.embed.weight[ids])
        assert torch.equal(ours.lm_head.weight[ids], src.lm_head.weight[ids])
    assert "text and image tokens" in printed and "verify: function preserved" in printed
    assert "verify: vocabulary: the source's vocab.yaml" in printed


def test_verify_fails_on_a_layout_that_differs_from_the_recorded_one(tmp_path, capsys, monkeypatch):
    """The import as it was (a new codebook appended after config.json's ids): the logits
    still agree (every expert is a copy), the vocabulary check does not."""
    from mm_moe.upcycle import hf_import, upcycling

    _, hf, _ = _exported(tmp_path, NO_QK_NORM)
    layout = upcycling.hf_layout

    def appended(ucfg, target):
        layout(ucfg, target)
        hf_cfg = hf_import.read_config(ucfg.source)
        return hf_import.source_layout(ucfg.source, hf_cfg, target.tokenizer._image().codebook_size)

    monkeypatch.setattr(upcycling, "hf_layout", appended)
    up = tmp_path / "up"
    code = upcycle([f"source={hf}", "source_format=hf", f"out={up}", "verify=true", *MOMA_TC])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "verify: FAILED" in printed and "image_offset" in printed, printed


def test_a_plain_llama_verify_says_what_it_did_not_check(tmp_path, capsys):
    _, hf, _ = _exported(tmp_path, NO_QK_NORM)
    for name in ("vocab.yaml", "mm_moe_tokenizer.yaml"):
        (hf / name).unlink()  # what a Llama from elsewhere looks like
    up = tmp_path / "up"
    assert upcycle([f"source={hf}", "source_format=hf", f"out={up}", "verify=true"]) == 0
    printed = capsys.readouterr().out
    assert "verify: vocabulary not checked" in printed and "text-only" in printed


BAD_FILES = [  # (file, text, what the refusal says)
    pytest.param("vocab.yaml", "!!python/object/apply:os.system [x]\n", "constructor", id="tag"),
    pytest.param("vocab.yaml", "- a list\n", "must map", id="vocab_list"),
    pytest.param("mm_moe_tokenizer.yaml", "text: gpt2\n", "gpt2", id="tokenizer_value"),
    pytest.param("mm_moe_tokenizer.yaml", "run: rm\n", "must map", id="tokenizer_key"),
]


@pytest.mark.parametrize("name, text, says", BAD_FILES)
def test_a_bad_recorded_file_is_refused_naming_it(tmp_path, name, text, says):
    _, hf, _ = _exported(tmp_path, NO_QK_NORM)
    (hf / name).write_text(text)
    with pytest.raises(UserError, match=f"{hf / name}: .*{says}"):
        upcycle([f"source={hf}", "source_format=hf", f"out={tmp_path / 'up'}"])
    assert not (tmp_path / "up").exists()


def test_a_layout_that_fits_neither_the_model_nor_its_tokenizer_is_refused(tmp_path):
    import yaml

    _, hf, _ = _exported(tmp_path, NO_QK_NORM)
    args = [f"source={hf}", "source_format=hf", f"out={tmp_path / 'up'}"]
    with pytest.raises(UserError, match="vocab.yaml: 64 image codes, .* has 8"):
        upcycle([*args, "tokenizer.levels=2"])  # a codebook of 2^3 codes
    fields = yaml.safe_load((hf / "vocab.yaml").read_text())
    fields["size"] += 10  # more ids than the model has rows
    (hf / "vocab.yaml").write_text(yaml.safe_dump(fields))
    with pytest.raises(UserError, match="vocab.yaml: 335 ids, but config.json has vocab_size=325"):
        upcycle(args)


def test_a_mixtral_export_is_refused_naming_the_way_back(tmp_path):
    source, hf, kind = _exported(tmp_path, NO_QK_NORM, MIXTRAL)
    assert kind == "mixtral"
    with pytest.raises(UserError, match="mixtral.*source_format=native") as info:
        upcycle([f"source={hf}", "source_format=hf", f"out={tmp_path / 'up'}"])
    assert "llama" in str(info.value) and "qwen3" in str(info.value)


def test_an_export_with_trained_tokenizers_reimports_with_them(tmp_path, demo_assets):
    """sentencepiece and the VQ travel in the export's mm_moe_tokenizer/ and come back: the
    import tokenizes text and images into the ids the source model was trained on."""
    import numpy as np
    from PIL import Image

    tok_dir, _ = demo_assets
    tokenizer = {"text": "sentencepiece", "image": "vq", "path": str(tok_dir)}
    source = _checkpoint(tmp_path / "src", {}, NO_QK_NORM, tokenizer)
    hf = tmp_path / "hf"
    assert export(ExportConfig(str(source), str(hf))) == "llama"
    up = tmp_path / "up"
    assert upcycle([f"source={hf}", "source_format=hf", f"out={up}", *MOMA_TC]) == 0
    assert {p.name for p in (up / "tokenizer").iterdir()} >= {"text.model", "vq.pt"}
    ours = mm_moe.load_tokenizers(up)
    theirs = mm_moe.load_tokenizers(source, {"path": str(tok_dir)})
    assert ours.vocab == theirs.vocab == Vocab.load(source / "vocab.yaml")
    text = "A photo of a cat, 42 times."
    assert ours.text_ids(text) == theirs.text_ids(text)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), np.uint8))
    assert np.array_equal(ours.image_token_ids(image), theirs.image_token_ids(image))
