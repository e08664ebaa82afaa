"""The shard builders of data_pipelines/: folder of pairs, interleaved JSONL, text files, and
offline pre-tokenization (whose shards must feed training exactly like on-the-fly tokenization)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from mm_moe.data.builders.interleaved import BuildInterleavedConfig
from mm_moe.data.builders.interleaved import build as build_interleaved
from mm_moe.data.builders.pairs import BuildPairsConfig
from mm_moe.data.builders.pairs import build as build_pairs
from mm_moe.data.builders.pretokenize import PretokenizeConfig
from mm_moe.data.builders.pretokenize import build as pretokenize
from mm_moe.data.builders.text import BuildTextConfig
from mm_moe.data.builders.text import build as build_text
from mm_moe.data.config import DataConfig, SourceConfig
from mm_moe.data.documents import DecodeOptions, DocumentBuilder
from mm_moe.data.shards import expand_urls
from mm_moe.data.stream import Stream
from mm_moe.data.tar_reader import iter_raw_samples
from mm_moe.tokenization.config import TokenizerConfig
from tests.data_shards import caption, image_bytes
from tests.helpers import PYTHON, REPO, _env

TOKENIZER = TokenizerConfig(image_size=16, grid=4, levels=4)


def _samples(pattern: str) -> list:
    return [s for url in expand_urls(pattern, "test") for s in iter_raw_samples(url)]


def _photo_folder(root, count=7):
    (root / "sub").mkdir(parents=True)
    for i in range(count):
        folder = root / "sub" if i % 2 else root
        ext = ["png", "jpg", "bmp"][i % 3]
        Image.open(__import__("io").BytesIO(image_bytes(i))).save(folder / f"img{i}.{ext}")
        (folder / f"img{i}.txt").write_text(caption(i) + "\n")
    Image.open(__import__("io").BytesIO(image_bytes(99))).save(root / "orphan.png")
    return root


def test_pairs_from_a_folder_and_refusing_a_non_empty_output(tmp_path):
    src = _photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    cfg = BuildPairsConfig(input=str(src), output=str(out), shard_size=3)
    pattern = build_pairs(cfg)
    samples = _samples(pattern)
    assert len(samples) == 7 and len(expand_urls(pattern, "t")) == 3
    assert {s.members["txt"].decode() for s in samples} == {caption(i) for i in range(7)}
    assert all({"txt", "json"} < set(s.members) for s in samples)
    assert sum("png" in s.members for s in samples) == 5  # bmp re-encoded as png
    paths = {json.loads(s.members["json"])["path"] for s in samples}
    assert "sub/img1.jpg" in paths and "orphan.png" not in paths
    with pytest.raises(ValueError, match="is not empty; pass overwrite=true"):
        build_pairs(cfg)
    cfg.overwrite, cfg.shard_size = True, 10
    assert len(expand_urls(build_pairs(cfg), "t")) == 1
    assert sorted(p.name for p in out.iterdir()) == ["pairs-000000.tar"]


def test_interleaved_from_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i))
    docs = [
        {
            "content": [
                {"type": "text", "text": "first"},
                {"type": "image", "path": "img/0.png"},
                {"type": "text", "text": "then"},
                {"type": "image", "path": "img/1.png"},
            ],
            "url": "https://example.org/a",
        },
        {"texts": [None, "caption after"], "images": ["img/2.png", None]},
        {"content": [{"type": "image", "path": "img/missing.png"}]},
    ]
    jsonl = tmp_path / "docs.jsonl"
    # half a surrogate pair, valid JSON: left out (training skipped it only after a crash fix)
    half = '{"content": [{"type": "text", "text": "half \\ud800 emoji"}]}'
    jsonl.write_text("\n".join([*(json.dumps(d) for d in docs), half]) + "\n")
    pattern = build_interleaved(
        BuildInterleavedConfig(input=str(jsonl), output=str(tmp_path / "out"), shuffle=False)
    )
    cfg = DataConfig(
        source="webdataset", num_streams=1, sources=[SourceConfig(pattern, "interleaved")]
    )
    spec = cfg.pipeline_spec(0, TOKENIZER)
    stream = Stream(0, spec, DocumentBuilder(TOKENIZER.build(), spec.decode))
    vocab = TOKENIZER.build().vocab
    first, second = stream._next_document().tokens, stream._next_document().tokens
    assert int((first == vocab.boi).sum()) == 2 and int((second == vocab.boi).sum()) == 1
    assert second[1] == vocab.boi  # the image came first
    assert bytes(t for t in first.tolist() if t < 256) == b"firstthen"
    assert len(_samples(pattern)) == 2  # the documents with a missing image or half an emoji
    # were left out
    meta = json.loads(_samples(pattern)[0].members["json"])["meta"]
    assert meta == {"url": "https://example.org/a"}


def test_text_files_by_paragraph(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("one\nstill one\n\n\ntwo\n")
    (tmp_path / "in" / "b.txt").write_text("three")
    (tmp_path / "in" / "c.txt").write_bytes(b"\xff\xfe not utf-8")
    pattern = build_text(
        BuildTextConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), unit="paragraph")
    )
    got = sorted(s.members["txt"].decode() for s in _samples(pattern))
    assert got == ["one\nstill one", "three", "two"]


def test_pretokenized_shards_feed_exactly_the_same_rows(tmp_path):
    src = _photo_folder(tmp_path / "photos", count=9)
    pairs = build_pairs(BuildPairsConfig(input=str(src), output=str(tmp_path / "p"), shard_size=2))
    tokens = pretokenize(
        PretokenizeConfig(
            input=pairs,
            format="pairs",
            output=str(tmp_path / "t"),
            tokenizer=TOKENIZER,
            pair_order="caption_first",
            processes=2,
        )
    )
    assert (tmp_path / "t" / "vocab.yaml").is_file()

    def rows(pattern, fmt):
        cfg = DataConfig(
            source="webdataset",
            seq_len=20,
            num_streams=2,
            num_workers=0,
            pair_order="caption_first",
            sources=[SourceConfig(pattern, fmt)],
        )
        loader = cfg.build(1, 0, 1, 4, 4, tokenizer=TOKENIZER)
        return [torch.cat([b.input_ids_BS for b in loader.next()]) for _ in range(6)]

    for a, b in zip(rows(pairs, "pairs"), rows(tokens, "tokens")):
        assert torch.equal(a, b)
    other = DataConfig(source="webdataset", sources=[SourceConfig(tokens, "tokens")])
    with pytest.raises(ValueError, match="vocab.yaml .* is not the vocabulary"):
        other.build(0, 0, 1, 8, 8, tokenizer=TokenizerConfig(image_size=16, levels=5))
    with pytest.raises(ValueError, match="tokenizer.yaml .* is not the run's tokenizer"):
        other.build(0, 0, 1, 8, 8, tokenizer=TokenizerConfig(image_size=16, grid=8))


def test_builder_scripts_run_and_name_bad_keys(tmp_path):
    (tmp_path / "in.txt").write_text("hello\nworld\n")
    run = lambda *args: subprocess.run(
        [PYTHON, str(REPO / "data_pipelines" / "build_text.py"), *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    ok = run(f"input={tmp_path / 'in.txt'}", f"output={tmp_path / 'out'}", "unit=line")
    assert ok.returncode == 0, ok.stderr
    assert "format: text" in ok.stdout and (tmp_path / "out" / "text-000000.tar").is_file()
    typo = run(f"input={tmp_path / 'in.txt'}", f"output={tmp_path / 'o2'}", "shard_sise=3")
    assert typo.returncode == 2 and "shard_sise" in typo.stderr and "shard_size" in typo.stderr


def test_a_bad_argument_leaves_the_shards_already_there(tmp_path):
    """overwrite=true with a shard_size no writer takes: refused before anything is removed."""
    src = _photo_folder(tmp_path / "photos")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("one document\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"content": [{"type": "text", "text": "hi"}]}) + "\n")
    jobs = [
        (build_pairs, BuildPairsConfig, dict(input=str(src))),
        (build_text, BuildTextConfig, dict(input=str(tmp_path / "texts"))),
        (build_interleaved, BuildInterleavedConfig, dict(input=str(jsonl))),
    ]
    for build, config, kwargs in jobs:
        out = tmp_path / f"out_{config.__name__}"
        build(config(output=str(out), **kwargs))
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(ValueError, match="shard_size=0 must be positive"):
            build(config(output=str(out), shard_size=0, overwrite=True, **kwargs))
        assert sorted(p.name for p in out.iterdir()) == before and before, config.__name__


def test_non_utf8_input_is_left_out_by_name(tmp_path, caplog):
    """A caption that is not UTF-8 is left out with a warning (not stored with replacement
    characters); an interleaved line that is not UTF-8 is left out by its line number; a
    JSONL with nothing usable leaves no empty shard behind."""
    src = _photo_folder(tmp_path / "photos", count=3)
    (src / "img0.txt").write_bytes("café crème".encode("latin-1"))
    with caplog.at_level("WARNING"):
        pattern = build_pairs(BuildPairsConfig(input=str(src), output=str(tmp_path / "p")))
    assert len(_samples(pattern)) == 2
    assert "captions are not UTF-8 and are left out" in caplog.text and "img0.txt" in caplog.text
    jsonl = tmp_path / "docs.jsonl"
    good = json.dumps({"content": [{"type": "text", "text": "fine"}]}).encode()
    bad = json.dumps({"content": [{"type": "text", "text": "X"}]}).encode().replace(b"X", b"\xe9")
    jsonl.write_bytes(good + b"\n\n" + bad + b"\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        pattern = build_interleaved(
            BuildInterleavedConfig(input=str(jsonl), output=str(tmp_path / "i"))
        )
    assert len(_samples(pattern)) == 1
    assert f"{jsonl} line 3: not UTF-8" in caplog.text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no usable document"):
        build_interleaved(BuildInterleavedConfig(input=str(empty), output=str(tmp_path / "e")))
    assert not list((tmp_path / "e").glob("*.tar"))


def test_images_pillow_cannot_decode_are_left_out_by_name(tmp_path, caplog):
    """A truncated PNG is left out when the shards are built (with a warning naming it), not
    packed for the loader to skip on every epoch; nothing decodable leaves no empty shard."""
    src = _photo_folder(tmp_path / "photos", count=3)
    (src / "img0.png").write_bytes((src / "img0.png").read_bytes()[:23])
    with caplog.at_level("WARNING"):
        pattern = build_pairs(BuildPairsConfig(input=str(src), output=str(tmp_path / "p")))
    samples = _samples(pattern)
    assert len(samples) == 2 and {s.key for s in samples} == {"000000000", "000000001"}
    assert "1 images cannot be decoded and are left out" in caplog.text
    assert "img0.png" in caplog.text
    jsonl = tmp_path / "docs.jsonl"
    lines = [
        {"content": [{"type": "text", "text": t}, {"type": "image", "path": f"photos/{path}"}]}
        for t, path in (("a", "img0.png"), ("b", "sub/img1.jpg"))
    ]
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        pattern = build_interleaved(
            BuildInterleavedConfig(input=str(jsonl), output=str(tmp_path / "i"), shuffle=False)
        )
    assert len(_samples(pattern)) == 1
    assert f"{jsonl} line 1: image photos/img0.png" in caplog.text
    for other in [*src.glob("img2.*"), *src.glob("sub/img1.*")]:
        if other.suffix != ".txt":
            other.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="no image that Pillow can decode"):
        build_pairs(BuildPairsConfig(input=str(src), output=str(tmp_path / "none")))
    assert not list((tmp_path / "none").glob("*.tar"))


def test_format_text_on_pairs_shards_is_refused_or_warned(tmp_path, caplog):
    """Format text reads only the captions of pairs shards: pretokenize refuses it (naming the
    image members and the formats that read them); the training loader warns once."""
    src = _photo_folder(tmp_path / "photos", count=2)
    pattern = build_pairs(BuildPairsConfig(input=str(src), output=str(tmp_path / "p")))
    cfg = PretokenizeConfig(
        input=pattern, format="text", output=str(tmp_path / "tok"), tokenizer=TOKENIZER
    )
    with pytest.raises(ValueError, match=r"format=text reads only KEY.txt.*\(png\).*pairs"):
        pretokenize(cfg)
    builder = DocumentBuilder(TOKENIZER.build(), DecodeOptions(1, 4.0, "random", 0.5))
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING"):
        docs = [builder.build("text", raw, rng) for raw in _samples(pattern)]
    assert len(docs) == 2 and caplog.text.count("format text reads only KEY.txt") == 1


def test_pretokenize_refuses_input_with_nothing_usable(tmp_path):
    (tmp_path / "junk-000000.tar").write_bytes(b"not a tar file at all")
    cfg = PretokenizeConfig(
        input=str(tmp_path / "junk-000000.tar"),
        format="pairs",
        output=str(tmp_path / "tok"),
        tokenizer=TOKENIZER,
    )
    with pytest.raises(ValueError, match="no usable document in 1 shard"):
        pretokenize(cfg)
    assert list((tmp_path / "tok").iterdir()) == []  # no empty shard to mistake for data
    with pytest.raises(ValueError, match="processes=0 must be >= 1"):
        PretokenizeConfig(input="x", format="pairs", output="y", processes=0)


def test_odd_image_modes_are_converted_and_unwritable_ones_skipped(tmp_path, caplog, monkeypatch):
    """A mode I (32-bit) or CMYK TIFF is converted by the loader's RGB policy and stored as PNG
    (Pillow cannot write those modes as PNG); bmp/gif/tif in interleaved documents are converted
    too; an image that still cannot be written is left out by name, not an abort with a tar."""
    src = tmp_path / "tif"
    src.mkdir()
    pixels = np.arange(12 * 10, dtype=np.int32).reshape(10, 12) * 500
    Image.fromarray(pixels, "I").save(src / "wide.tif")
    Image.open(__import__("io").BytesIO(image_bytes(1))).convert("CMYK").save(src / "cmyk.tif")
    Image.open(__import__("io").BytesIO(image_bytes(2))).save(src / "plain.bmp")
    for stem in ("wide", "cmyk", "plain"):
        (src / f"{stem}.txt").write_text(f"a {stem} image")
    samples = _samples(build_pairs(BuildPairsConfig(input=str(src), output=str(tmp_path / "p"))))
    pngs = {
        s.members["txt"].decode(): Image.open(__import__("io").BytesIO(s.members["png"]))
        for s in samples
    }
    assert {k: (v.mode, v.size) for k, v in pngs.items()} == {
        f"a {stem} image": ("RGB", (12, 10) if stem == "wide" else (16, 16))
        for stem in ("wide", "cmyk", "plain")
    }
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"texts": ["x", None], "images": [None, "tif/wide.tif"]}) + "\n")
    doc = _samples(
        build_interleaved(BuildInterleavedConfig(input=str(jsonl), output=str(tmp_path / "i")))
    )[0]
    assert json.loads(doc.members["json"])["content"][1] == {"type": "image", "member": "1.png"}
    assert Image.open(__import__("io").BytesIO(doc.members["1.png"])).mode == "RGB"

    def refuse(self, fp, format=None, **kwargs):
        raise OSError(f"cannot write mode {self.mode} as {format}")

    (src / "ok.png").write_bytes(image_bytes(3))
    (src / "ok.txt").write_text("fine")
    monkeypatch.setattr(Image.Image, "save", refuse)
    with caplog.at_level("WARNING"):
        pattern = build_pairs(BuildPairsConfig(input=str(src), output=str(tmp_path / "q")))
    assert [s.members["txt"] for s in _samples(pattern)] == [b"fine"]
    assert "3 images cannot be decoded and are left out" in caplog.text
    assert "cannot write mode RGB as PNG" in caplog.text


def test_obelics_lists_need_exactly_one_string_per_position(tmp_path, caplog):
    """A parallel-list document with a position that is not exactly one string (both null,
    both set, a number) is left out by file and line, not an abort and not written for the
    loader to skip on every epoch; a document with no content left is left out too."""
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    docs = [
        {"texts": [None], "images": [None]},
        {"texts": [1, None], "images": [None, "a.png"]},
        {"texts": ["t"], "images": ["a.png"]},
        {"texts": ["  ", "\n"], "images": [None, None]},
        {"texts": ["kept", None], "images": [None, "a.png"]},
    ]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    with caplog.at_level("WARNING"):
        pattern = build_interleaved(
            BuildInterleavedConfig(input=str(jsonl), output=str(tmp_path / "i"), shuffle=False)
        )
    samples = _samples(pattern)
    assert [json.loads(s.members["json"])["content"] for s in samples] == [
        [{"type": "text", "text": "kept"}, {"type": "image", "member": "1.png"}]
    ]
    assert "4 documents left out" in caplog.text
    for line in (1, 2, 3, 4):
        assert f"{jsonl} line {line}: " in caplog.text


def test_bom_and_blank_captions(tmp_path, caplog):
    """A UTF-8 BOM is not kept in captions, text documents or the first JSONL line; a
    whitespace-only caption is left out with a warning (the loader would skip it every epoch)."""
    src = _photo_folder(tmp_path / "photos", count=3)
    (src / "img0.txt").write_bytes(b"\xef\xbb\xbfa red square\n")
    (src / "img2.txt").write_text(" \n\t\n")
    with caplog.at_level("WARNING"):
        pattern = build_pairs(BuildPairsConfig(input=str(src), output=str(tmp_path / "p")))
    assert sorted(s.members["txt"] for s in _samples(pattern)) == sorted(
        [b"a red square", caption(1).encode()]
    )
    assert "1 captions are empty and are left out" in caplog.text and "img2.txt" in caplog.text
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_bytes(b"\xef\xbb\xbfone\n\ntwo")
    (tmp_path / "t" / "blank.txt").write_text("\n  \n")
    with caplog.at_level("WARNING"):
        pattern = build_text(
            BuildTextConfig(
                input=str(tmp_path / "t"), output=str(tmp_path / "to"), unit="paragraph"
            )
        )
    assert sorted(s.members["txt"] for s in _samples(pattern)) == [b"one", b"two"]
    assert "1 files hold no text and are left out" in caplog.text and "blank.txt" in caplog.text
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"texts": ["x"], "images": [None]}).encode())
    pattern = build_interleaved(
        BuildInterleavedConfig(input=str(jsonl), output=str(tmp_path / "i"))
    )
    assert len(_samples(pattern)) == 1


def test_a_folder_url_reads_every_shard_in_it_and_names_subfolders_it_does_not(tmp_path, caplog):
    """Plain and gzipped tars in any case (.tar, .TAR, .tar.gz, .tgz) are the folder's shards;
    a subfolder holding shards is named in a warning (before, four of these five shards were
    left out without a word), and the shard count is logged."""
    import gzip
    import logging
    import tarfile

    def tar(path, key):
        raw = tmp_path / f"{key}.txt"
        raw.write_text(f"text of {key}")
        with tarfile.open(path, "w") as t:
            t.add(raw, arcname=f"{key}.txt")
        if path.suffix in (".gz", ".tgz"):
            data = path.read_bytes()
            path.write_bytes(gzip.compress(data))

    folder = tmp_path / "shards"
    (folder / "sub").mkdir(parents=True)
    for name, key in [("a.tar", "a"), ("B.TAR", "b"), ("c.tar.gz", "c"), ("d.tgz", "d")]:
        tar(folder / name, key)
    tar(folder / "sub" / "e.tar", "e")
    (folder / "notes.txt").write_text("not a shard")
    with caplog.at_level(logging.INFO, logger="mm_moe.data.shards"):
        shards = expand_urls(str(folder), "data.sources[0]")
    assert [os.path.basename(s) for s in shards] == ["B.TAR", "a.tar", "c.tar.gz", "d.tgz"]
    keys = sorted(s.key for url in shards for s in iter_raw_samples(url))
    assert keys == ["a", "b", "c", "d"]
    assert (
        f"{folder}: its subfolders are not read, and {folder / 'sub'} holds shards" in caplog.text
    )
    assert "data.sources[0]: 4 shard(s)" in caplog.text
    # a folder and a glob naming the same shards: each read once, and said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mm_moe.data.shards"):
        both = expand_urls([str(folder), str(folder / "*.tar"), str(folder / "a.tar")], "k")
    assert both == shards
    assert "k: 2 shard(s) named more than once by the urls are read once per epoch" in (caplog.text)


def test_upper_case_captions_and_images_the_loader_would_skip(tmp_path, caplog):
    """`IMG.JPG` + `IMG.TXT` is a pair; images below data.min_image_side's default or beyond
    data.max_aspect_ratio's are stored but said, with the key, in both image builders (training
    would skip them on every epoch), counting only the images of stored samples."""
    src = tmp_path / "photos"
    src.mkdir()
    Image.new("RGB", (32, 32), "red").save(src / "A.JPG")
    (src / "A.TXT").write_text("a red square")
    Image.new("RGB", (8, 8), "blue").save(src / "tiny.png")
    (src / "tiny.txt").write_text("a small blue square")
    Image.new("RGB", (200, 20), "green").save(src / "wide.png")
    (src / "wide.Txt").write_text("a green strip")
    with caplog.at_level("WARNING"):
        pattern = build_pairs(BuildPairsConfig(input=str(src), output=str(tmp_path / "p")))
    assert sorted(s.members["txt"] for s in _samples(pattern)) == [
        b"a green strip",
        b"a red square",
        b"a small blue square",
    ]
    assert "have no caption" not in caplog.text
    assert "1 of 3 stored images have a shorter side below 16 pixels" in caplog.text
    assert "data.min_image_side" in caplog.text and "tiny.png (8x8)" in caplog.text
    assert "1 of 3 stored images have a longer side over 4.0x" in caplog.text
    assert "data.max_aspect_ratio" in caplog.text and "wide.png (200x20)" in caplog.text

    caplog.clear()
    docs = [
        {"texts": ["small", None], "images": [None, "photos/tiny.png"]},
        {"texts": [None, None], "images": ["photos/tiny.png", "photos/missing.png"]},
        {"texts": ["fine", None], "images": [None, "photos/A.JPG"]},
    ]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(d) for d in docs))
    with caplog.at_level("WARNING"):
        build_interleaved(BuildInterleavedConfig(input=str(jsonl), output=str(tmp_path / "i")))
    assert "1 documents left out" in caplog.text  # the missing image's: its tiny.png uncounted
    assert "1 of 2 stored images have a shorter side below 16 pixels" in caplog.text
    assert "image photos/tiny.png (8x8)" in caplog.text
    assert "longer side" not in caplog.text


def test_loose_files_given_as_shards_say_how_to_build_shards(tmp_path):
    """A folder of loose images (to train_image) or a plain text file (to train_text's
    sources) were refused as "holds no shards" / "broken (unreadable_shard)"."""
    from mm_moe.data.shards import expand_urls
    from mm_moe.errors import UserError

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(image_bytes(0))
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(
        UserError, match=r"holds no shards .* but 1 loose file\(s\) \(e.g. 0.png\).*build_pairs"
    ):
        expand_urls(str(tmp_path / "images"), "sources")
    with pytest.raises(UserError, match=r"notes.txt is not a shard \(a tar file\).*build_text"):
        expand_urls(str(tmp_path / "notes.txt"), "sources")
    # a tar named otherwise is still a shard
    import tarfile

    with tarfile.open(tmp_path / "data.shard", "w") as tar:
        tar.add(tmp_path / "notes.txt", arcname="a.txt")
    assert expand_urls(str(tmp_path / "data.shard"), "sources") == [str(tmp_path / "data.shard")]
