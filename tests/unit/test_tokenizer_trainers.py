"""The tokenizer trainers' commands (`python -m mm_moe.tokenization.train_text` / `train_image`):
a user's mistake is one UserError naming the key or file, never sentencepiece's or torch's
traceback; a trained tokenizer is never replaced without overwrite=true."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import tarfile

import pytest

from mm_moe import train_image_tokenizer as train_image
from mm_moe import train_text_tokenizer as train_text
from mm_moe.errors import UserError
from mm_moe.tokenization.config import TrainImageConfig, TrainTextConfig, VQConfig
from tests.helpers import REPO


@pytest.fixture(scope="module")
def doc_file(tmp_path_factory):
    """Python's own docs: 87 distinct characters, more than 300 - 262 fixed pieces cover."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "topics.txt"
    path.write_text("\n".join(topics[k] for k in sorted(topics)[:40]), encoding="utf-8")
    return path


def _train(tmp_path, files, **kw):
    kw.setdefault("output", str(tmp_path / "tok"))
    return train_text.train(TrainTextConfig(files=files, **kw))


def test_vocab_size_below_what_the_text_needs_names_the_minimum(doc_file, tmp_path):
    with pytest.raises(UserError, match=r"vocab_size=300 .*at least \d+") as err:
        _train(tmp_path, [str(doc_file)], vocab_size=300)
    assert "\n" not in str(err.value) and not (tmp_path / "tok").exists()
    need = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert need > 300  # the number named is the real minimum: training with it works
    assert _train(tmp_path, [str(doc_file)], vocab_size=need).is_file()


def test_vocab_size_above_what_the_text_supports_names_the_maximum(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a small text\nwith few words in it\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab_size=50000 .*at most \d+") as err:
        _train(tmp_path, [str(small)], vocab_size=50000)
    most = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    assert _train(tmp_path, [str(small)], vocab_size=most).is_file()


def test_input_mistakes_are_user_errors(doc_file, tmp_path, caplog):
    with pytest.raises(UserError, match="missing.txt"):
        _train(tmp_path, [str(doc_file), str(tmp_path / "missing.txt")], vocab_size=400)
    empty, blank, latin = tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "latin1.txt"
    empty.write_bytes(b"")
    blank.write_text(" \n\t\n", encoding="utf-8")
    latin.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    for files in ([empty], [empty, blank], [latin]):
        with pytest.raises(UserError, match="no text to train on") as err:
            _train(tmp_path, [str(f) for f in files], vocab_size=400)
    # the reason there was none: said (it claimed the file held no non-blank line)
    assert str(err.value).endswith(f"left out as not UTF-8: {latin}")
    # UTF-16 with its byte order mark (what Windows tools write) is read
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(doc_file.read_text(encoding="utf-8").encode("utf-16"))
    assert _train(tmp_path, [str(utf16)], vocab_size=400, overwrite=True).is_file()
    # too little text for any allowed vocab_size: "set vocab_size to <300>" was impossible
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one line\nanother line\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"too little text .*at least 300.*give more text"):
        _train(tmp_path, [str(tiny)], vocab_size=300, model_type="unigram", overwrite=True)
    # Shards with no text (a tokens shard's members) give the same message.
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "tokens-000000.tar", "w") as tar:
        for name in ("doc0.tokens.npy", "doc0.modality.npy"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"\0\0\0\0"))
    with pytest.raises(UserError, match="no text to train on"):
        train_text.train(TrainTextConfig(output=str(tmp_path / "s"), sources=[str(shards)]))
    # A file that is not UTF-8 is left out with a warning naming it; the rest trains.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mm_moe"):
        assert _train(
            tmp_path, [str(latin), str(doc_file)], vocab_size=400, overwrite=True
        ).is_file()
    assert any("latin1.txt" in r.getMessage() for r in caplog.records)


def test_a_trained_tokenizer_is_never_replaced_silently(doc_file, tmp_path):
    out = tmp_path / "tok"
    model = _train(tmp_path, [str(doc_file)], vocab_size=400)
    before = model.read_bytes()
    with pytest.raises(UserError, match=rf"{re.escape(str(out))}.*overwrite=true"):
        _train(tmp_path, [str(doc_file)], vocab_size=500)
    assert model.read_bytes() == before
    assert _train(tmp_path, [str(doc_file)], vocab_size=500, overwrite=True) == model
    assert model.read_bytes() != before
    # The image trainer refuses before reading any image (its sources need not exist), and
    # does not count the text tokenizer beside it as its own.
    (out / "vq.yaml").write_text("{}")
    image_cfg = dict(output=str(out), sources=[str(tmp_path / "none")], steps=1)
    with pytest.raises(UserError, match=rf"{re.escape(str(out))}.*vq.yaml.*overwrite=true"):
        train_image.train(TrainImageConfig(**image_cfg))
    with pytest.raises(UserError) as err:  # overwrite=true: on to reading the images
        train_image.train(TrainImageConfig(**image_cfg, overwrite=True))
    assert "overwrite" not in str(err.value)
    (out / "vq.yaml").unlink()
    with pytest.raises(UserError) as err:
        train_image.train(TrainImageConfig(**image_cfg))
    assert "overwrite" not in str(err.value)
    # output= a file (or below one): refused before training, which the save lost
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output in (a_file, a_file / "sub"):
        with pytest.raises(UserError, match=f"{a_file} is a file, not a folder"):
            _train(tmp_path, [str(doc_file)], vocab_size=400, output=str(output))
        with pytest.raises(UserError, match=f"{a_file} is a file, not a folder"):
            train_image.train(TrainImageConfig(**{**image_cfg, "output": str(output)}))


def test_vq_channels_must_suit_the_group_norm():
    from mm_moe.tokenization.vq.model import VQVAE

    for channels in (4, 12, 30):
        with pytest.raises(UserError, match=rf"vq.channels={channels} .*multiple of 8"):
            VQConfig(channels=channels)
    VQVAE(VQConfig(channels=24, codebook_size=4, code_dim=4))  # every accepted value builds
    # every refusal names its vq. key
    for bad, named in [
        ({"codebook_size": 1}, "vq.codebook_size=1 must be >= 2"),
        ({"code_dim": 0}, "vq.code_dim=0 must be >= 1"),
        ({"downsample": 3}, "vq.downsample=3 must be a power of two"),
        ({"resolution": 30}, "vq.resolution=30 must be a multiple of vq.downsample=4"),
        ({"ema_decay": 1.5}, r"vq.ema_decay=1.5 must be in \[0, 1\)"),
        ({"commitment": -1.0}, "vq.commitment=-1.0 .* must be >= 0"),
        ({"restart_threshold": -5.0}, "vq.restart_threshold=-5.0 must be >= 0"),
    ]:
        with pytest.raises(UserError, match=named):
            VQConfig(**bad)
    for bad in ({"max_images": -1}, {"threads": -1}):  # -1 trained on one image / a traceback
        with pytest.raises(UserError, match=f"{next(iter(bad))}=-1"):
            TrainImageConfig(sources=["x"], **bad)


def test_a_bad_heldout_is_named_before_the_vq_trains(tmp_path, monkeypatch):
    """heldout= was read after training: a typo there threw the trained VQ away, and the
    error said `sources`."""
    import webdataset as wds
    from PIL import Image

    shards = tmp_path / "pairs-000000.tar"
    with wds.TarWriter(str(shards)) as sink:
        for i in range(3):
            png = io.BytesIO()
            Image.new("RGB", (32, 32), (80 * i, 40, 200)).save(png, format="PNG")
            sink.write({"__key__": f"s{i}", "png": png.getvalue(), "txt": f"picture {i}"})
    trained = []
    monkeypatch.setattr("mm_moe.tokenization.vq.train.train_vq", lambda *a, **k: trained.append(1))
    cfg = TrainImageConfig(
        output=str(tmp_path / "vq"), sources=[str(shards)], heldout=[str(tmp_path / "typo")]
    )
    with pytest.raises(UserError, match=r"^heldout: shard .*typo does not exist"):
        train_image.train(cfg)
    assert not trained


def test_train_text_command_help_and_exit_status(tmp_path):
    """One line and exit 2 for a missing file; --help lists the command's own keys only."""
    cmd = [sys.executable, "-m", "mm_moe.tokenization.train_text"]
    runs = {
        "missing": subprocess.Popen(
            [*cmd, f"files=[{tmp_path / 'missing.txt'}]", f"output={tmp_path / 'tok'}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "help": subprocess.Popen(
            [*cmd, "--help"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
        # a misspelt key: named with a did-you-mean (Hydra's own advice was `+vocab_sise=300`)
        "misspelt": subprocess.Popen(
            [*cmd, "vocab_sise=300"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    }
    out = {name: (*p.communicate(timeout=120), p.returncode) for name, p in runs.items()}
    _, err, code = out["missing"]
    assert code == 2 and "missing.txt" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    _, err, code = out["misspelt"]
    assert code == 2 and "unknown config key 'vocab_sise'. Did you mean 'vocab_size'?" in err, err
    help_text, _, code = out["help"]
    assert code == 0
    for key in ("output", "sources", "files", "vocab_size", "model_type", "max_chars", "overwrite"):
        assert re.search(rf"^\s*{key}:", help_text, re.M), (key, help_text)
    for group in ("model:", "moe:", "data:", "optim:", "Configuration groups"):
        assert group not in help_text, help_text


def test_max_chars_bounds_the_text_read(tmp_path):
    """max_chars cuts the text it reaches, not at the end of that text's file or document."""
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("a" * 5000)
    small.write_text("b" * 10)
    cfg = TrainTextConfig(output=str(tmp_path / "tok"), files=[str(big), str(small)])
    assert [len(t) for t in train_text.texts(cfg)] == [5000, 10]
    cfg.max_chars = 1200
    assert list(train_text.texts(cfg)) == ["a" * 1200]
    cfg.max_chars = 5004
    assert list(train_text.texts(cfg)) == ["a" * 5000, "b" * 4]


def test_lines_longer_than_sentencepiece_takes_are_cut_not_dropped(tmp_path):
    """sentencepiece skips sentences over 16,384 bytes without a word: a corpus of long
    paragraphs trained a tokenizer on its short lines only. They are cut into sentences."""
    from mm_moe.tokenization.sentencepiece_text import SentencePieceTextTokenizer, fitting

    line = "alpha beta ωμέγα ζήτα " * 2000  # 56,000 bytes, one line
    parts = list(fitting(line, 16384))
    assert "".join(parts) == line and all(len(p.encode()) <= 16384 for p in parts)
    assert all(p.endswith(" ") for p in parts[:-1])  # cut after whitespace
    corpus = tmp_path / "long.txt"
    corpus.write_text(line + "\nshort one\nand two\n", encoding="utf-8")
    tok = SentencePieceTextTokenizer(_train(tmp_path, [str(corpus)], vocab_size=310))
    assert len(tok.encode("alpha beta ωμέγα ζήτα")) <= 8  # its words learned, not bytes


def test_damaged_tokenizer_files_are_named_in_one_line(tmp_path, demo_assets):
    """An interrupted copy of vq.pt, a vq.yaml of another VQ, an unreadable vq.yaml or a cut
    text.model: one line naming the file (tracebacks, one advising weights_only=False)."""
    import shutil

    from mm_moe.tokenization.sentencepiece_text import SentencePieceTextTokenizer
    from mm_moe.tokenization.vq.tokenizer import VQImageTokenizer

    tok_dir, _ = demo_assets
    weights, config = (tok_dir / "vq.pt").read_bytes(), (tok_dir / "vq.yaml").read_text()
    other = config.replace("codebook_size: ", "codebook_size: 1")  # another VQ's shapes
    cases = {
        "cut_weights": (weights[: len(weights) // 3], config, "vq.pt"),
        "garbage_weights": (b"garbage\n", config, "vq.pt"),
        "other_config": (weights, other, "vq.pt"),
        "bad_yaml": (weights, "{[: not yaml", "vq.yaml"),
    }
    for name, (w, c, named) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "vq.pt").write_bytes(w)
        (folder / "vq.yaml").write_text(c)
        with pytest.raises(UserError, match=f"{folder / named}: .*damaged") as err:
            VQImageTokenizer(folder)
        assert "\n" not in str(err.value) and "weights_only" not in str(err.value), name
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tok_dir / "text.model", cut / "text.model")
    (cut / "text.model").write_bytes((tok_dir / "text.model").read_bytes()[:3000])
    with pytest.raises(UserError, match=f"{cut / 'text.model'} is not a readable sentencepiece"):
        SentencePieceTextTokenizer(cut / "text.model")
