"""Damaged or unusual files a user hands the project: a clear UserError naming the file and
what is valid, or (where the file is fine, only unusual) a working result."""

from __future__ import annotations

import json

import pytest

from mm_moe.errors import UserError
from mm_moe.tokenization.config import TokenizerConfig
from mm_moe.upcycle import hf_import
from tests.hf_fixtures import make_tokenizer

LLAMA3_EOS = [2, 5, 6]  # end_of_text, end_of_turn, eom (ids of the tiny tokenizer's vocabulary)


def _config(folder, **fields):
    base = {"model_type": "llama", "vocab_size": 300, "bos_token_id": 0}
    (folder / "config.json").write_text(json.dumps({**base, **fields}))
    return json.loads((folder / "config.json").read_text())


def test_damaged_hugging_face_config_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": ')
    with pytest.raises(UserError, match=rf"{tmp_path / 'config.json'} is not valid.*JSON object"):
        hf_import.read_config(tmp_path)
    (tmp_path / "config.json").write_text('["llama"]')
    with pytest.raises(UserError, match="is not valid: a JSON list"):
        hf_import.read_config(tmp_path)
    make_tokenizer(tmp_path, 300, image_tokens=False)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>",')
    with pytest.raises(UserError, match=rf"{tmp_path / 'tokenizer_config.json'} is not valid"):
        TokenizerConfig(text="hf", path=str(tmp_path)).build()
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=rf"{tmp_path / 'tokenizer.json'} cannot be read"):
        TokenizerConfig(text="hf", path=str(tmp_path)).build()


def test_an_eos_id_list_without_a_tokenizer_takes_the_first(tmp_path):
    hf = _config(tmp_path, eos_token_id=LLAMA3_EOS)  # Llama 3's config.json, no tokenizer
    vocab = hf_import.source_layout(tmp_path, hf, codebook_size=16)
    assert (vocab.bos, vocab.eos) == (0, LLAMA3_EOS[0])
    assert (vocab.pad, vocab.boi, vocab.eoi, vocab.image_offset) == (300, 301, 302, 303)
    hf = _config(tmp_path, eos_token_id=["2"])
    with pytest.raises(UserError, match=r"config.json: eos_token_id=\['2'\] must be an id"):
        hf_import.source_layout(tmp_path, hf, codebook_size=16)


@pytest.mark.parametrize("where", ["tokenizer", "config"])
def test_a_pad_that_is_eos_gets_an_id_of_its_own(tmp_path, where):
    """Llama-family fine-tunes set pad = eos; padding would mask eos out of the loss, so the
    vocabulary gives pad a fresh id and keeps eos the tokenizer's."""
    tok = make_tokenizer(tmp_path, 300, image_tokens=False)
    eos = tok.token_to_id("</s>")
    if where == "tokenizer":
        config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        vocab = TokenizerConfig(text="hf", path=str(tmp_path)).build().vocab
    else:
        (tmp_path / "tokenizer_config.json").unlink()
        hf = _config(tmp_path, vocab_size=300, eos_token_id=eos, pad_token_id=eos)
        (tmp_path / "tokenizer.json").unlink()
        vocab = hf_import.source_layout(tmp_path, hf, codebook_size=16)
    assert vocab.eos == eos and vocab.pad == 300 and vocab.text_size == 300


def _png_bytes() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["not_an_image", "truncated", "missing"])
def test_generate_names_an_image_it_cannot_read(tmp_path, capsys, kind):
    from mm_moe import generate

    bad = tmp_path / "photo.png"
    if kind != "missing":
        bad.write_bytes(b"plain text" if kind == "not_an_image" else _png_bytes()[:200])
    with pytest.raises(SystemExit) as exit_info:
        generate.main([f"checkpoint={tmp_path}", f"image={bad}", "mode=text"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f"image={bad} cannot be read as an image" in err and "Traceback" not in err


def _labelled(i: int, cls: bytes | None = None, png: bytes | None = None) -> dict:
    from tests.data_shards import image_bytes

    png = image_bytes(i) if png is None else png
    return {"__key__": f"d{i:04d}", "png": png, "cls": str(i % 3).encode() if cls is None else cls}


@pytest.mark.parametrize(
    "defect,match",
    [
        ({"cls": b"seven"}, r"sample 'd0002': the `cls` member holds 'seven'; .*\[0, 3\)"),
        ({"cls": b"2.5"}, r"sample 'd0002': the `cls` member holds '2.5'"),
        ({"cls": b"3"}, r"sample 'd0002': the `cls` member holds '3'; .*\[0, 3\)"),
        ({"png": b"\x89PNG\r\n\x1a\n broken"}, r"sample 'd0002'.png cannot be read as an image"),
    ],
    ids=["word", "fraction", "out_of_range", "corrupt_image"],
)
def test_a_defective_labelled_sample_is_named(tmp_path, defect, match):
    from mm_moe.eval.labelled import labelled_images
    from tests.data_shards import write_shards

    good = write_shards(tmp_path / "good", [_labelled(i) for i in range(4)], per_shard=4)
    pairs = labelled_images(good, 10, "eval.zero_shot.urls", 3)
    assert [label for _, label in pairs] == [0, 1, 2, 0]
    samples = [_labelled(i, **(defect if i == 2 else {})) for i in range(4)]
    urls = write_shards(tmp_path / "bad", samples, per_shard=4)
    with pytest.raises(UserError, match=rf"eval.zero_shot.urls: .*shard-000000.tar, {match}"):
        labelled_images(urls, 10, "eval.zero_shot.urls", 3)
    assert len(labelled_images(urls, 2, "eval.zero_shot.urls", 3)) == 2  # before the defect


class _Planted:
    def __reduce__(self):
        return (print, ("a planted pickle ran",))


def test_a_truncated_checkpoint_file_is_called_damaged_and_a_pickle_unsafe(tmp_path):
    """Two causes, two remedies: a truncated file (a copy cut short) is named damaged with the
    way out (an earlier step); a file holding code objects is named as refused by
    weights_only, and the planted code does not run."""
    import torch

    from mm_moe.checkpoint.layout import read_tensors

    whole = tmp_path / "model.pt"
    torch.save({"w": torch.ones(64, 64)}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"cut.pt.*damaged or truncated; resume from another"):
        read_tensors(cut)
    planted = tmp_path / "planted.pt"
    torch.save({"w": _Planted()}, planted)
    with pytest.raises(UserError, match=r"planted.pt.*only tensors and plain values"):
        read_tensors(planted)


def test_a_missing_or_damaged_config_yaml_is_named(tmp_path):
    """A step's config.yaml: missing (where a model must be built from it) or not the YAML
    mapping the save wrote is a UserError naming the file, not a YAML traceback."""
    from mm_moe.checkpoint.layout import read_config

    step = tmp_path / "step_00000001"
    step.mkdir()
    with pytest.raises(UserError, match=r"config.yaml is missing"):
        read_config(step)
    assert read_config(step, required=False) is None
    for text in ("model: {d_model: [unclosed", "just a string", ""):
        (step / "config.yaml").write_text(text)
        with pytest.raises(UserError, match=r"config.yaml is damaged"):
            read_config(step, required=False)
    (step / "config.yaml").write_text("model: {d_model: 32}\n")
    assert read_config(step) == {"model": {"d_model": 32}}
