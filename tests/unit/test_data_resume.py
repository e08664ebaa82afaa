"""Elastic determinism of the webdataset loader: the global batch of step s depends only on
sources, seed and s; a saved state resumes with exactly the next batch, at any world size,
worker count and micro-batch size, also across epoch boundaries."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
import torch

from mm_moe.data.batch import Batch
from mm_moe.data.config import DataConfig, SourceConfig
from mm_moe.tokenization.config import TokenizerConfig
from tests.data_shards import image_bytes, interleaved, pairs, texts, write_shards

SEED, GLOBAL = 3, 8
TOKENIZER = TokenizerConfig(image_size=16, grid=4, levels=4)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return [
        SourceConfig(write_shards(root / "pairs", pairs(15), 5), "pairs", 2.0),
        SourceConfig(write_shards(root / "text", texts(12), 6), "text", 1.0),
        SourceConfig(write_shards(root / "il", interleaved(6), 3), "interleaved", 1.0),
    ]


def _loader(sources, rank=0, world=1, micro=GLOBAL, workers=0, streams=4, seq_len=24):
    cfg = DataConfig(
        source="webdataset",
        seq_len=seq_len,
        sources=sources,
        num_streams=streams,
        num_workers=workers,
    )
    return cfg.build(SEED, rank, world, micro, GLOBAL, tokenizer=TOKENIZER)


def _cat(batches: list[Batch]) -> dict[str, torch.Tensor]:
    tensors = [f.name for f in fields(Batch) if f.name.endswith("_BS")]
    return {name: torch.cat([getattr(b, name) for b in batches]) for name in tensors}


def _assert_equal(a: dict, b: dict, step) -> None:
    for name in a:
        assert torch.equal(a[name], b[name]), (step, name)


def _run(loader, steps: int) -> list[dict]:
    return [_cat(loader.next()) for _ in range(steps)]


def _json(state: dict) -> dict:
    return json.loads(json.dumps(state))  # what meta.json stores


def test_next_8_batches_after_resume_equal_the_uninterrupted_stream(sources):
    straight = _run(_loader(sources), 12)
    first = _loader(sources, workers=2)
    assert all(
        _assert_equal(a, b, s) is None for s, (a, b) in enumerate(zip(_run(first, 4), straight))
    )
    state = _json(first.state_dict())
    resumed = _loader(sources, workers=1, micro=2)
    resumed.load_state_dict(state)
    for step, batch in enumerate(_run(resumed, 8), start=4):
        _assert_equal(batch, straight[step], step)
    assert resumed.counters() == _loader_after(sources, 12).counters()


def _loader_after(sources, steps):
    loader = _loader(sources)
    _run(loader, steps)
    return loader


def test_global_batch_is_independent_of_world_size_workers_and_micro_batch(sources):
    straight = _run(_loader(sources), 5)
    for world, streams in [(2, 4), (4, 2)]:  # (4, 2): two ranks share each stream
        ranks = [
            _loader(sources, r, world, micro=1, workers=2, streams=streams) for r in range(world)
        ]
        reference = straight if streams == 4 else _run(_loader(sources, streams=2), 5)
        for step in range(5):
            parts = [_cat(rank.next()) for rank in ranks]
            joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            _assert_equal(joined, reference[step], (world, step))


def test_states_from_two_ranks_resume_on_one(sources):
    straight = _run(_loader(sources), 10)
    ranks = [_loader(sources, r, 2, micro=2) for r in range(2)]
    for _ in range(3):
        for rank in ranks:
            rank.next()
    # Without torch.distributed the ranks cannot send rank 0 their states: merge them here
    # the way the per-step gather does.
    merged = ranks[0].state_dict()
    for j in ranks[1].owned:
        merged["streams"][str(j)] = ranks[1].states[j]
    one = _loader(sources, micro=4)
    one.load_state_dict(_json(merged))
    for step, batch in enumerate(_run(one, 7), start=3):
        _assert_equal(batch, straight[step], step)
    totals = {k: ranks[0].counters()[k] + ranks[1].counters()[k] for k in one.counters()}
    assert totals == _loader_after(sources, 3).counters()


def test_resume_at_an_epoch_boundary(tmp_path):
    # Every document is exactly one row (bos + 13 bytes + eos = seq_len + 1), one stream, three
    # shards of 2: an epoch is 6 rows = 3 steps of 2 rows, so steps 3, 6, ... end an epoch.
    samples = [{"__key__": f"k{i}", "txt": f"document {i:04d}"} for i in range(6)]
    pattern = write_shards(tmp_path, samples, per_shard=2)
    src = [SourceConfig(pattern, "text")]
    make = lambda: DataConfig(
        source="webdataset", seq_len=14, sources=src, num_streams=1, num_workers=0
    ).build(SEED, 0, 1, 2, 2, tokenizer=TOKENIZER)
    straight = _run(make(), 14)
    rows = torch.cat([b["input_ids_BS"] for b in straight])
    docs = [int(bytes(r[10:14].tolist()).decode()) for r in rows]
    # Each epoch (6 rows) holds every document once; the shard order is reshuffled by epoch.
    epochs = [docs[6 * e : 6 * e + 6] for e in range(4)]
    assert all(sorted(e) == list(range(6)) for e in epochs), epochs
    assert len({tuple(e) for e in epochs}) > 1, epochs
    loader = make()
    for stop in range(1, 13):
        loader.next()
        state = _json(loader.state_dict())
        reader = state["streams"]["0"]["sources"][0]
        if stop % 3 == 0:  # the last sample of the epoch consumed: next read starts epoch+1
            assert (reader["epoch"], reader["position"], reader["offset"]) == (stop // 3 - 1, 2, 2)
        resumed = make()
        resumed.load_state_dict(state)
        for step, batch in enumerate(_run(resumed, 2), start=stop):
            _assert_equal(batch, straight[step], step)


def test_sources_are_mixed_by_weight_and_pair_order_is_configurable(sources):
    from mm_moe.data.documents import DocumentBuilder
    from mm_moe.data.stream import Stream

    cfg = DataConfig(source="webdataset", sources=sources, pair_order="random", num_streams=4)
    spec = cfg.pipeline_spec(SEED, TOKENIZER)
    stream = Stream(0, spec, DocumentBuilder(TOKENIZER.build(), spec.decode))
    vocab = TOKENIZER.build().vocab
    kinds = {"pairs": 0, "text": 0, "interleaved": 0}
    caption_first = 0
    for _ in range(400):
        doc = stream._next_document().tokens
        boi = int((doc == vocab.boi).sum())
        kind = "text" if boi == 0 else "pairs" if boi == 1 else "interleaved"
        kinds[kind] += 1
        caption_first += kind == "pairs" and doc[1] != vocab.boi
    assert abs(kinds["pairs"] / 400 - 0.5) < 0.08, kinds
    assert abs(kinds["text"] / 400 - 0.25) < 0.08, kinds
    assert 0.35 < caption_first / kinds["pairs"] < 0.65
    for order, want in [("caption_first", True), ("image_first", False)]:
        cfg = DataConfig(source="webdataset", sources=sources[:1], pair_order=order)
        spec = cfg.pipeline_spec(SEED, TOKENIZER)
        stream = Stream(0, spec, DocumentBuilder(TOKENIZER.build(), spec.decode))
        assert all((stream._next_document().tokens[1] != vocab.boi) == want for _ in range(10))


def test_mismatched_resume_and_batch_layout_fail_clearly(sources):
    loader = _loader(sources)
    loader.next()
    with pytest.raises(ValueError, match="data.num_streams: checkpoint 4, this run 2"):
        _loader(sources, streams=2).load_state_dict(_json(loader.state_dict()))
    weight = sources[0].weight
    reweighted = [replace(sources[0], weight=weight + 1), *sources[1:]]
    changed = rf"\(data.sources\[0\].weight: checkpoint {weight}, this run {weight + 1}\)"
    with pytest.raises(ValueError, match=changed):
        _loader(reweighted).load_state_dict(_json(loader.state_dict()))
    with pytest.raises(ValueError, match="webdataset source"):
        _loader(sources).load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="multiple of data.num_streams=3"):
        _loader(sources, streams=3)
    with pytest.raises(ValueError, match=r"data.sources\[0\].urls: shard .* does not exist"):
        _loader([SourceConfig("/nonexistent/a-{0..3}.tar", "pairs")])
    # A refused state leaves the loader as it was: it goes on exactly where it stood.
    before = _json(loader.state_dict())
    with pytest.raises(ValueError, match="data.num_streams"):
        loader.load_state_dict(_json(_loader(sources, streams=2).state_dict()))
    assert _json(loader.state_dict()) == before
    resumed = _loader(sources)
    resumed.load_state_dict(before)
    _assert_equal(_cat(loader.next()), _cat(resumed.next()), 1)


def test_shards_rebuilt_in_place_refuse_an_exact_resume_and_copies_do_not(tmp_path):
    """The same shard names with other samples (a builder rerun with overwrite=true and
    another seed) no longer match a saved position; the same shards copied elsewhere under the
    same names do (the names are compared as before)."""
    import shutil
    import time

    folder = tmp_path / "pairs"
    source = [SourceConfig(write_shards(folder, pairs(12), 4), "pairs", 1.0)]
    loader = _loader(source)
    loader.next()
    state = _json(loader.state_dict())
    _loader(source).load_state_dict(state)  # unchanged: fine
    shutil.copytree(folder, tmp_path / "kept")
    write_shards(folder, pairs(12)[::-1], 4)  # other samples under the same names
    with pytest.raises(ValueError, match=r"the shards of data.sources\[0\] changed since"):
        _loader(source).load_state_dict(state)
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "kept", folder)  # the originals back (copied: other mtimes)
    _loader(source).load_state_dict(state)
    time.sleep(1.1)  # tar headers record whole seconds
    write_shards(folder, pairs(12), 4)  # the same samples written again: other mtimes, fine
    _loader(source).load_state_dict(state)
    # the same shards at another path (moved, or copied to a node's local disk) resume too;
    # a checkpoint from before shards were named by file name (its fingerprint of the paths) too
    moved = [SourceConfig(str(tmp_path / "kept"), "pairs", 1.0)]
    _loader(moved).load_state_dict(state)
    from mm_moe.data.webdataset_loader import described, fingerprint

    older = {**state, "fingerprint": fingerprint(_loader(source).spec, paths=True)}
    _loader(source).load_state_dict(older)
    with pytest.raises(ValueError, match="data position was saved for other data.sources"):
        _loader(moved).load_state_dict(older)  # the paths it named are not these
    # such an older save refused for another reason names that reason, not every source's urls
    older["described"] = described(_loader(source).spec, paths=True)
    reweighted = [replace(source[0], weight=2.0)]
    with pytest.raises(
        ValueError, match=r"\(data.sources\[0\].weight: checkpoint 1.0, this run 2.0\)"
    ):
        _loader(reweighted).load_state_dict(older)
    del state["contents"]  # a checkpoint from before the digest: not compared
    write_shards(folder, pairs(12)[::-1], 4)
    _loader(source).load_state_dict(state)


def _small_source_with_a_bad_shard(root) -> list[SourceConfig]:
    """3 img2dataset shards of 6 samples; the last holds one good sample among 5 corrupt
    ones, so with 8 streams (3 slices a shard) two of its slices hold only bad samples."""
    from tests.data_shards import write_raw_tar

    good = [(s["__key__"], s["png"], s["txt"].encode()) for s in pairs(13)]
    members = lambda items: [
        m for key, png, txt in items for m in ((f"{key}.png", png), (f"{key}.txt", txt))
    ]
    write_raw_tar(root / "pairs-000000.tar", members(good[0:6]))
    write_raw_tar(root / "pairs-000001.tar", members(good[6:12]))
    bad = [(f"bad{i}", b"\x89PNG not an image", b"a caption") for i in range(5)]
    write_raw_tar(root / "pairs-000002.tar", members([good[12], *bad]))
    return [SourceConfig(str(root / "pairs-{000000..000002}.tar"), "pairs")]


def test_streams_whose_slices_hold_only_bad_samples_borrow_from_the_source(tmp_path):
    sources = _small_source_with_a_bad_shard(tmp_path)
    make = lambda **kw: _loader(sources, streams=8, **kw)
    straight = _run(make(), 10)
    loader = make()
    _run(loader, 10)
    borrowing = [
        j for j, state in loader.state_dict()["streams"].items() if state["sources"][0]["borrowing"]
    ]
    assert borrowing, "no stream met only bad slices: the test does not test borrowing"
    assert loader.counters()["data/skipped_corrupt_image"] > 0
    # Resume mid-run (also on two ranks): the same batches as the uninterrupted run.
    for stop in (3, 6):
        first = make(workers=1)
        _run(first, stop)
        resumed = make(micro=4)
        resumed.load_state_dict(_json(first.state_dict()))
        for step, batch in enumerate(_run(resumed, 10 - stop), start=stop):
            _assert_equal(batch, straight[step], step)
    ranks = [make(rank=r, world=2, micro=2) for r in range(2)]
    for step in range(10):
        parts = [_cat(rank.next()) for rank in ranks]
        _assert_equal({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, straight[step], step)


def test_a_source_without_one_usable_sample_fails_naming_it(tmp_path):
    from mm_moe.data.defects import DataError
    from tests.data_shards import write_raw_tar

    members = [m for i in range(4) for m in ((f"b{i}.png", b"\x89PNG bad"), (f"b{i}.txt", b"a"))]
    write_raw_tar(tmp_path / "only-bad.tar", members)
    loader = _loader([SourceConfig(str(tmp_path / "only-bad.tar"), "pairs")], streams=8)
    with pytest.raises(DataError, match=r"data.sources\[0\] \(pairs\): a whole epoch .*only-bad"):
        loader.next()
    with pytest.raises(DataError, match=r"this stream skipped: \d+ corrupt_image\)"):
        _loader([SourceConfig(str(tmp_path / "only-bad.tar"), "pairs")], streams=8).next()
    # images all too small: the message names the key that sets the limit
    small = [
        m
        for i in range(4)
        for m in ((f"s{i}.png", image_bytes(i, size=(8, 8))), (f"s{i}.txt", b"a"))
    ]
    write_raw_tar(tmp_path / "small.tar", small)
    with pytest.raises(DataError, match=r"small_image\); the limits are data.min_image_side"):
        _loader([SourceConfig(str(tmp_path / "small.tar"), "pairs")], streams=2).next()
    # a tar without samples: said so, not "on_error=raise names the first bad sample"
    write_raw_tar(tmp_path / "empty.tar", [])
    with pytest.raises(DataError, match=r"skipped: nothing\): its shards hold no samples"):
        _loader([SourceConfig(str(tmp_path / "empty.tar"), "pairs")], streams=2).next()


def test_a_source_dealt_unevenly_over_the_streams_is_said(tmp_path, caplog):
    """3 shards over 8 streams (3 slices each, 9 units): one stream reads two units, the
    others one, so its samples came half as often, without a word."""
    from mm_moe.data.shards import uneven_share

    assert uneven_share(3, 8) == (2, 1) and uneven_share(10, 8) == (2, 1)
    assert uneven_share(16, 8) is None and uneven_share(2, 8) is None
    source = [SourceConfig(write_shards(tmp_path / "p", pairs(12), 4), "pairs", 1.0)]
    with caplog.at_level("WARNING", logger="mm_moe"):
        _loader(source)
    # _loader's 4 streams: 2 slices each, 6 units, two streams read 2, two read 1
    assert "its 3 shard(s) (2 slices each) deal unevenly over data.num_streams=4" in caplog.text
    assert "read up to 2x as often" in caplog.text


def test_a_killed_data_worker_is_one_line_that_says_what_continues(tmp_path):
    """A worker killed by the OOM killer ended the run with torch's traceback."""
    from mm_moe.data.defects import DataError

    source = [SourceConfig(write_shards(tmp_path / "p", pairs(8), 4), "pairs", 1.0)]
    loader = _loader(source)
    loader.next()

    def killed():
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
        yield  # a generator

    loader._iter = killed()
    with pytest.raises(DataError, match=r"a data worker stopped .*checkpoint.resume=auto"):
        loader.next()


def test_a_damaged_vocab_file_is_named(tmp_path):
    from mm_moe.errors import UserError
    from mm_moe.tokenization.vocab import Vocab

    path = tmp_path / "vocab.yaml"
    Vocab.from_sizes(40, 16).save(path)
    path.write_text(path.read_text()[:20] + "\n  : [")
    with pytest.raises(UserError, match=rf"invalid vocabulary file {path} \(\w+Error"):
        Vocab.load(path)
