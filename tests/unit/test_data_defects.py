"""Bad data: every planted defect is skipped and counted under its reason, the good samples
around it are used (odd image modes converted, not skipped), and on_error=raise fails naming
the shard and the key."""

from __future__ import annotations

import io
import json
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from mm_moe.data.config import DataConfig, SourceConfig
from mm_moe.data.defects import REASONS, DataError, SampleError, counter_key
from mm_moe.data.documents import DocumentBuilder
from mm_moe.data.stream import Stream
from mm_moe.data.tar_reader import iter_raw_samples
from mm_moe.tokenization.config import TokenizerConfig
from tests.data_shards import image_bytes, write_raw_tar

TOKENIZER = TokenizerConfig(image_size=16, grid=4, levels=4)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _odd_modes() -> dict[str, tuple[str, bytes]]:
    rgb = Image.open(io.BytesIO(image_bytes(5)))
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, format="JPEG")
    wide = np.random.default_rng(0).integers(0, 65536, (16, 16), dtype=np.uint16)
    return {
        "cmyk": ("jpg", cmyk.getvalue()),
        "rgba": ("png", _png(rgb.convert("RGBA"))),
        "palette": ("png", _png(rgb.convert("P"))),
        "grey16": ("png", _png(Image.fromarray(wide))),
    }


def _truncated_jpeg() -> bytes:
    data = image_bytes(9, size=(32, 32), fmt="JPEG")
    return data[: len(data) // 2]


# (members in tar order, expected counts): each good sample's caption starts with "good".
PAIRS_MEMBERS = [
    ("g0.png", image_bytes(0)),
    ("g0.txt", b"good zero"),
    ("c1.jpg", b"\xff\xd8 not really a jpeg"),
    ("c1.txt", b"bad corrupt"),
    ("c2.jpg", _truncated_jpeg()),
    ("c2.txt", b"bad truncated image"),
    ("m1.png", image_bytes(1)),  # no caption
    ("m2.txt", b"bad no image"),
    ("e1.png", image_bytes(2)),
    ("e1.txt", b"  \n "),
    ("u1.png", image_bytes(3)),
    ("u1.txt", b"bad \xff\xfe latin"),
    ("s1.png", image_bytes(4)),  # split key: s1.txt comes after g6
    ("g6.png", image_bytes(6)),
    ("g6.txt", b"good six"),
    ("s1.txt", b"bad split"),
    ("t1.png", image_bytes(7, size=(4, 4))),
    ("t1.txt", b"bad tiny"),
    ("w1.png", image_bytes(8, size=(80, 16))),
    ("w1.txt", b"bad wide"),
    *[
        m
        for name, (ext, data) in _odd_modes().items()
        for m in [(f"{name}.{ext}", data), (f"{name}.txt", f"good {name}".encode())]
    ],
    ("g7.png", image_bytes(10)),
    ("g7.txt", b"good seven"),
]
PAIRS_EXPECTED = {
    "corrupt_image": 2,
    "missing_text": 2,
    "missing_image": 1,
    "empty_text": 1,
    "bad_utf8": 1,
    "split_key": 1,
    "small_image": 1,
    "aspect_ratio": 1,
}
GOOD_CAPTIONS = [
    b"good zero",
    b"good six",
    *[f"good {n}".encode() for n in _odd_modes()],
    b"good seven",
]


def _stream(urls: str, fmt: str, on_error: str = "skip") -> Stream:
    cfg = DataConfig(
        source="webdataset", sources=[SourceConfig(urls, fmt)], num_streams=1, on_error=on_error
    )
    spec = cfg.pipeline_spec(0, TOKENIZER)
    return Stream(0, spec, DocumentBuilder(TOKENIZER.build(), spec.decode))


def _texts(docs) -> list[bytes]:
    return [bytes(int(t) for t in d.tokens if t < 256) for d in docs]


def test_every_pairs_defect_is_counted_and_good_samples_are_used(tmp_path):
    write_raw_tar(tmp_path / "pairs.tar", PAIRS_MEMBERS)
    stream = _stream(str(tmp_path / "pairs.tar"), "pairs")
    docs = [stream._next_document() for _ in GOOD_CAPTIONS]  # the whole first epoch
    assert sorted(_texts(docs)) == sorted(GOOD_CAPTIONS)
    assert stream.skipped == {r: PAIRS_EXPECTED.get(r, 0) for r in REASONS}
    vocab = TOKENIZER.build().vocab
    assert all(int((d.tokens == vocab.boi).sum()) == 1 for d in docs)  # every image used


def test_the_first_skip_of_each_reason_is_named_with_its_shard_and_key(tmp_path, caplog):
    """With data.on_error=skip (the default), one warning per reason names the shard, the key
    and why (split_key with its usual cause and fix); the counters count the rest."""
    import logging

    from mm_moe.data import stream as stream_module

    stream_module._NAMED_SKIPS.clear()
    stream_module._MOSTLY_SKIPPED.clear()
    write_raw_tar(tmp_path / "pairs.tar", PAIRS_MEMBERS)
    stream = _stream(str(tmp_path / "pairs.tar"), "pairs")
    with caplog.at_level(logging.WARNING, logger="mm_moe.data.stream"):
        for _ in range(2 * len(GOOD_CAPTIONS)):  # two epochs: each reason is named once
            stream._next_document()
    named = [r.getMessage() for r in caplog.records if "Further skips" in r.getMessage()]
    assert len(named) == len(PAIRS_EXPECTED), named
    # more of the shard skipped than used: said once, with the main reason
    good, bad = len(GOOD_CAPTIONS), sum(PAIRS_EXPECTED.values())
    assert bad > good
    (most,) = [r.getMessage() for r in caplog.records if "samples read here" in r.getMessage()]
    assert f"{bad} of its {good + bad} samples read here were skipped (2 corrupt_image)" in most
    for reason in PAIRS_EXPECTED:
        (line,) = [m for m in named if f"skipped {reason} in shard" in m]
        assert str(tmp_path / "pairs.tar") in line and "key '" in line, line
        assert f"counted in data/skipped_{reason}" in line
    (split,) = [m for m in named if "skipped split_key" in m]
    assert "key 's1'" in split and "tar --sort=name" in split


def test_hand_made_samples_bmp_tiff_and_extra_images(tmp_path, caplog):
    """A pairs sample whose image is .bmp, .gif or .tiff is read (it was missing_image); a
    sample with more images than its format reads is used and said once, naming them."""
    import logging

    def as_(fmt: str) -> bytes:
        out = io.BytesIO()
        Image.open(io.BytesIO(image_bytes(1))).save(out, format=fmt)
        return out.getvalue()

    members = [
        ("b.bmp", as_("BMP")),
        ("b.txt", b"a bitmap"),
        ("t.tiff", as_("TIFF")),
        ("t.txt", b"a tiff"),
        ("x.jpg", as_("JPEG")),
        ("x.png", image_bytes(2)),
        ("x.txt", b"two images"),
    ]
    write_raw_tar(tmp_path / "hand.tar", members)
    stream = _stream(str(tmp_path / "hand.tar"), "pairs")
    with caplog.at_level(logging.WARNING, logger="mm_moe.data.documents"):
        docs = [stream._next_document() for _ in range(3)]
    assert sorted(_texts(docs)) == [b"a bitmap", b"a tiff", b"two images"]
    assert not any(stream.skipped.values())
    unread = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert len(unread) == 1 and "sample x holds images it does not read (x.png)" in unread[0]


def _tar_bytes(members) -> bytes:
    path = io.BytesIO()
    with tarfile.open(fileobj=path, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.getvalue()


def test_truncated_tar_keeps_what_came_before_and_unreadable_shard_is_counted(tmp_path):
    members = [(f"t{i}.txt", f"text number {i} ".encode() * 20) for i in range(5)]
    whole = _tar_bytes(members)
    cut = whole.index(b"text number 3") + 100  # inside t3's data
    (tmp_path / "a-0.tar").write_bytes(whole[:cut])
    (tmp_path / "a-1.tar").write_bytes(b"this is not a tar file at all" * 40)
    stream = _stream(str(tmp_path / "a-{0..1}.tar"), "text")
    # The break is in t3's data, so t2 is complete and used; t3 and t4 are lost.
    docs = [stream._next_document() for _ in range(4)]  # the fourth comes from epoch 1
    assert [t[:13] for t in _texts(docs)] == [b"text number %d" % i for i in (0, 1, 2, 0)]
    assert stream.skipped["truncated_tar"] == 1 and stream.skipped["unreadable_shard"] == 1


def test_interleaved_and_tokens_defects(tmp_path):
    good = {"content": [{"type": "text", "text": "good doc"}, {"type": "image", "member": "0.png"}]}
    obelics = {"texts": ["good obelics", None], "images": [None, "0.png"]}
    missing = {"content": [{"type": "image", "member": "1.png"}]}
    write_raw_tar(
        tmp_path / "il.tar",
        [
            ("d0.json", b"{not json"),
            ("d1.json", json.dumps(missing).encode()),
            ("d1.0.png", image_bytes(0)),
            ("d2.json", json.dumps({"content": [{"type": "video"}]}).encode()),
            ("d3.0.png", image_bytes(1)),  # no json at all
            ("d4.json", json.dumps({"content": []}).encode()),
            # valid JSON, but half a surrogate pair (scraped corpora hold them): it crashed
            # training under data.on_error=skip with a UnicodeEncodeError
            ("d4b.json", b'{"content": [{"type": "text", "text": "half \\ud800 emoji"}]}'),
            ("d5.json", json.dumps(good).encode()),
            ("d5.0.png", image_bytes(2)),
            ("d6.json", json.dumps(obelics).encode()),
            ("d6.0.png", image_bytes(3)),
        ],
    )
    stream = _stream(str(tmp_path / "il.tar"), "interleaved")
    docs = [stream._next_document() for _ in range(2)]
    assert _texts(docs) == [b"good doc", b"good obelics"]
    assert {k: v for k, v in stream.skipped.items() if v} == {
        "bad_json": 2,
        "missing_image": 1,
        "missing_text": 1,
        "empty_text": 1,
        "bad_utf8": 1,
    }

    def npy(array) -> bytes:
        out = io.BytesIO()
        np.save(out, array)
        return out.getvalue()

    vocab = TOKENIZER.build().vocab
    ok = np.array([vocab.bos, 65, vocab.boi, vocab.image_offset, vocab.eoi, vocab.eos], np.int32)
    ok_mod = np.array([0, 0, 0, 1, 0, 0], np.uint8)
    write_raw_tar(
        tmp_path / "tok.tar",
        [
            ("k0.tokens.npy", npy(ok)),  # no modality
            ("k1.tokens.npy", npy(ok + 1000)),
            ("k1.modality.npy", npy(ok_mod)),  # out of vocab
            ("k2.tokens.npy", npy(ok)),
            ("k2.modality.npy", npy(ok_mod[::-1].copy())),  # mismatch
            ("k3.tokens.npy", b"garbage"),
            ("k3.modality.npy", npy(ok_mod)),
            ("k4.tokens.npy", npy(ok)),
            ("k4.modality.npy", npy(ok_mod)),
        ],
    )
    stream = _stream(str(tmp_path / "tok.tar"), "tokens")
    assert stream._next_document().tokens.tolist() == ok.tolist()
    assert {k: v for k, v in stream.skipped.items() if v} == {"bad_tokens": 4}


def test_loader_counters_report_every_reason(tmp_path):
    write_raw_tar(tmp_path / "pairs.tar", PAIRS_MEMBERS)
    cfg = DataConfig(
        source="webdataset",
        seq_len=32,
        num_streams=1,
        num_workers=1,
        sources=[SourceConfig(str(tmp_path / "pairs.tar"), "pairs")],
    )
    loader = cfg.build(0, 0, 1, 2, 2, tokenizer=TOKENIZER)
    for _ in range(6):
        loader.next()
    counters = loader.counters()
    assert set(counters) == {counter_key(r) for r in REASONS} | {"data/documents"}
    assert all(counters[counter_key(r)] >= n for r, n in PAIRS_EXPECTED.items())


@pytest.mark.parametrize(
    "members, key",
    [
        (PAIRS_MEMBERS[:6], "c1"),
        ([("g0.png", image_bytes(0)), ("g0.txt", b"fine"), ("m1.png", image_bytes(1))], "m1"),
        (PAIRS_MEMBERS[:2] + [("s1.png", image_bytes(4))] + PAIRS_MEMBERS[13:16], "s1"),
    ],
)
def test_on_error_raise_names_shard_and_key(tmp_path, members, key):
    write_raw_tar(tmp_path / "bad-7.tar", members)
    cfg = DataConfig(
        source="webdataset",
        seq_len=32,
        num_streams=1,
        num_workers=1,
        on_error="raise",
        sources=[SourceConfig(str(tmp_path / "bad-7.tar"), "pairs")],
    )
    loader = cfg.build(0, 0, 1, 2, 2, tokenizer=TOKENIZER)
    with pytest.raises(DataError) as err:
        for _ in range(4):
            loader.next()
    assert str(tmp_path / "bad-7.tar") in str(err.value) and f"key '{key}'" in str(err.value)
    assert "BytesIO" not in str(err.value)  # Pillow's in-memory file says nothing to a user


def test_on_error_raise_on_a_truncated_tar(tmp_path):
    whole = _tar_bytes([(f"t{i}.txt", f"words of t{i} ".encode() * 30) for i in range(4)])
    (tmp_path / "cut.tar").write_bytes(whole[: whole.index(b"words of t2") + 50])
    stream = _stream(str(tmp_path / "cut.tar"), "text", on_error="raise")
    with pytest.raises(DataError, match=r"truncated_tar in shard .*cut.tar, key 't2'"):
        for _ in range(5):
            stream._next_document()


def test_pipe_urls_stream_the_same_samples_and_a_failing_command_is_counted(tmp_path):
    write_raw_tar(tmp_path / "good.tar", PAIRS_MEMBERS[:2] + PAIRS_MEMBERS[-2:])
    local = _stream(str(tmp_path / "good.tar"), "pairs")
    piped = _stream(f"pipe:cat {tmp_path / 'good.tar'}", "pairs")
    for _ in range(3):
        assert np.array_equal(local._next_document().tokens, piped._next_document().tokens)
    urls = [f"pipe:cat {tmp_path / 'missing.tar'}", str(tmp_path / "good.tar")]
    stream = _stream(urls, "pairs")
    [stream._next_document() for _ in range(4)]  # two epochs of the good shard
    assert stream.skipped["unreadable_shard"] >= 1


def test_a_pipe_command_failing_after_a_whole_tar_loses_no_sample(tmp_path):
    """Every sample the command wrote is read, whenever it exits; its failure status is then
    counted against the shard (truncated_tar: it was opened). 40 KiB: more than tarfile's
    first read, less than a pipe's buffer (the command writes it all and exits at once)."""
    write_raw_tar(tmp_path / "good.tar", [(f"t{i}.txt", b"x" * 5000) for i in range(8)])
    keys = [raw.key for raw in iter_raw_samples(str(tmp_path / "good.tar"))]
    url = f"pipe:cat {tmp_path / 'good.tar'}; exit 3"
    samples = iter_raw_samples(url)
    got = [next(samples).key]
    time.sleep(0.3)  # the command has exited before the rest is read
    with pytest.raises(SampleError, match="exit 3") as err:
        for raw in samples:
            got.append(raw.key)
    assert got == keys and err.value.reason == "truncated_tar"


def _cut_points(whole: bytes) -> dict[str, tuple[int, list[str], str | None]]:
    """Where to cut `whole` -> (cut offset, keys read before the error, key the error names);
    key None: nothing is cut, no error."""
    with tarfile.open(fileobj=io.BytesIO(whole), mode="r:") as tar:
        infos = tar.getmembers()
    t3, last = infos[3], infos[-1]
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    keys = [i.name.split(".")[0] for i in infos]
    return {
        # At a member boundary the sample being read may lack members: it is dropped too.
        "at_member_boundary": (t3.offset, keys[:2], "t2"),
        "inside_header": (t3.offset + 100, keys[:2], "t2"),
        "inside_data": (t3.offset_data + 10, keys[:3], "t3"),
        "before_end_blocks": (end, keys[:-1], keys[-1]),
        "inside_end_blocks": (end + tarfile.BLOCKSIZE, keys[:-1], keys[-1]),
        "whole": (len(whole), keys, None),
    }


def _cut_tar_url(tmp_path, data: bytes, kind: str) -> str:
    import gzip

    path = tmp_path / ("cut.tar.gz" if kind == "gzip" else "cut.tar")
    path.write_bytes(gzip.compress(data) if kind == "gzip" else data)
    return f"pipe:cat {path}" if kind == "pipe" else str(path)


_SIX_TEXTS = [(f"t{i}.txt", f"text of t{i} ".encode() * 30) for i in range(6)]


@pytest.mark.parametrize("kind", ["plain", "gzip", "pipe"])
@pytest.mark.parametrize("where", list(_cut_points(_tar_bytes(_SIX_TEXTS))))
def test_a_tar_without_its_end_of_archive_blocks_is_truncated(tmp_path, kind, where):
    """A tar cut at a member boundary or inside a header used to end as if complete; only the
    end-of-archive blocks say a tar is whole (also through gzip and `pipe:`)."""
    from mm_moe.data.defects import SampleError
    from mm_moe.data.tar_reader import iter_raw_samples

    whole = _tar_bytes(_SIX_TEXTS)
    cut, keys_read, error_key = _cut_points(whole)[where]
    got: list[str] = []
    url = _cut_tar_url(tmp_path, whole[:cut], kind)
    if error_key is None:
        got = [s.key for s in iter_raw_samples(url)]
    else:
        with pytest.raises(SampleError) as err:
            got.extend(s.key for s in iter_raw_samples(url))
        assert (err.value.reason, err.value.key) == ("truncated_tar", error_key)
    assert got == keys_read


def test_a_broken_shard_read_in_slices_is_counted_once_an_epoch(tmp_path):
    """With more streams than shards each stream reads a slice of the shard and meets its
    break: it used to be counted by every slice (4 streams: 4 skips for one lost sample)."""
    whole = _tar_bytes(_SIX_TEXTS)
    (tmp_path / "cut.tar").write_bytes(whole[: _cut_points(whole)["before_end_blocks"][0]])
    cfg = DataConfig(
        source="webdataset",
        sources=[SourceConfig(str(tmp_path / "cut.tar"), "text")],
        num_streams=4,
    )
    spec = cfg.pipeline_spec(0, TOKENIZER)
    builder = DocumentBuilder(TOKENIZER.build(), spec.decode)
    streams = [Stream(i, spec, builder) for i in range(4)]
    for stream in streams:  # past the break: into each stream's second epoch
        for _ in range(3):
            stream._next_document()
    epochs = [stream.readers[0].epoch for stream in streams]
    skips = [stream.skipped["truncated_tar"] for stream in streams]
    owner = 5 % 4  # t5's slice: the sample the break cost
    assert skips[owner] == epochs[owner] >= 1 and sum(skips) == skips[owner]


def test_a_cut_gzip_stream_is_truncated(tmp_path):
    import gzip

    from mm_moe.data.defects import SampleError
    from mm_moe.data.tar_reader import iter_raw_samples

    packed = gzip.compress(_tar_bytes(_SIX_TEXTS))
    (tmp_path / "cut.tar.gz").write_bytes(packed[: len(packed) // 2])
    got: list[str] = []
    with pytest.raises(SampleError) as err:
        got.extend(s.key for s in iter_raw_samples(str(tmp_path / "cut.tar.gz")))
    assert err.value.reason == "truncated_tar"
    assert got == [k for k, _ in (n.split(".") for n, _ in _SIX_TEXTS[: len(got)])]
    assert len(got) < len(_SIX_TEXTS)


@pytest.mark.parametrize("kind", ["plain", "gzip", "pipe"])
def test_a_shard_cut_at_a_member_boundary_is_counted_or_raises(tmp_path, kind):
    whole = _tar_bytes(_SIX_TEXTS)
    cut, _, _ = _cut_points(whole)["at_member_boundary"]
    url = _cut_tar_url(tmp_path, whole[:cut], kind)
    stream = _stream(url, "text")
    docs = [stream._next_document() for _ in range(3)]  # t0, t1, then t0 of epoch 1
    assert [t[:10] for t in _texts(docs)] == [b"text of t%d" % i for i in (0, 1, 0)]
    assert stream.skipped["truncated_tar"] == 1
    stream = _stream(url, "text", on_error="raise")
    with pytest.raises(DataError, match=r"truncated_tar in shard .*cut\.tar.*, key 't2'"):
        for _ in range(3):
            stream._next_document()


def test_readers_without_on_error_refuse_a_shard_cut_at_a_member_boundary(tmp_path):
    """Tokenizer training and the labelled evaluation set have no data.on_error: a cut shard is
    a UserError naming it, not a quietly smaller corpus."""
    from mm_moe.data.corpus import iter_texts
    from mm_moe.errors import UserError
    from mm_moe.eval.labelled import labelled_images

    whole = _tar_bytes(_SIX_TEXTS)
    url = _cut_tar_url(tmp_path, whole[: _cut_points(whole)["at_member_boundary"][0]], "plain")
    with pytest.raises(UserError, match=r"sources: shard .*cut\.tar is broken \(truncated_tar\)"):
        list(iter_texts([url]))
    with pytest.raises(UserError, match=r"eval\.urls: shard .*cut\.tar is broken"):
        labelled_images(url, 10, "eval.urls", 10)
    assert len(list(iter_texts([_cut_tar_url(tmp_path, whole, "plain")]))) == len(_SIX_TEXTS)


def test_tokenizer_corpora_count_what_they_leave_out(tmp_path, caplog):
    """The tokenizer trainers read shards through iter_texts and iter_images, which skip what
    does not decode: once read through, a warning counts it and names one."""
    from mm_moe.data.corpus import iter_images, iter_texts

    write_raw_tar(tmp_path / "mixed.tar", PAIRS_MEMBERS)
    url = str(tmp_path / "mixed.tar")
    with caplog.at_level("WARNING", logger="mm_moe.data.corpus"):
        texts, images = list(iter_texts([url])), list(iter_images([url]))
    assert texts and images
    # e1's blank caption and u1's Latin-1 one; the shard's broken and too-small images
    assert "2 text samples could not be decoded and were left out, e.g." in caplog.text
    assert "mixed.tar:e1 (" in caplog.text
    assert "3 images could not be decoded and were left out, e.g." in caplog.text
