"""The study corpus (data_pipelines/build_study_corpus.py, issue 31): every training image a
distinct deformation, none a held-out image, the demo's held-out digits, deterministic per seed,
and pretokenized shards equal to tokenizing the pairs on the fly."""

from __future__ import annotations

import io
import json
import subprocess
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import affine_transform

from mm_moe.cli import run_job
from mm_moe.data.builders.study_corpus import StudyCorpusConfig, build, draw_unique, pixel_digest
from mm_moe.data.config import DataConfig, SourceConfig
from mm_moe.data.deform import DeformConfig, deform
from mm_moe.data.digits import mnist
from mm_moe.data.documents import DecodeOptions, DocumentBuilder
from mm_moe.data.shards import expand_urls
from mm_moe.data.tar_reader import iter_raw_samples
from mm_moe.errors import UserError
from mm_moe.tokenization.config import TokenizerConfig
from tests.helpers import PYTHON, REPO, _env


def _samples(folder) -> list:
    return [s for url in expand_urls(str(folder), "test") for s in iter_raw_samples(url)]


def _pixels(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample.members["png"])))


def test_300_pairs_distinct_not_heldout_read_back_and_pretokenized(tmp_path, demo_assets):
    tok_dir, demo_heldout = demo_assets
    num_heldout = len(_samples(demo_heldout))  # 250 in the small test build, 500 in make train's
    out = tmp_path / "study"
    args = [f"output={out}", "pairs=300", "seed=1", f"tokenizers={tok_dir}"]
    run = subprocess.run(
        [PYTHON, str(REPO / "data_pipelines" / "build_study_corpus.py"), *args,
         f"heldout={num_heldout}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "format: tokens" in run.stdout
    pairs = _samples(out / "pairs")
    images = [_pixels(s) for s in pairs]
    assert len(pairs) == 300 and all(im.shape == (28, 28) for im in images)
    train = {pixel_digest(im) for im in images}
    assert len(train) == 300  # distinct as pixel arrays
    held = {pixel_digest(_pixels(s)) for s in _samples(out / "heldout")}
    assert held == {pixel_digest(_pixels(s)) for s in _samples(demo_heldout)}  # the demo's own
    moved = _samples(out / "heldout_deformed")
    assert [s.key for s in moved] == [s.key for s in _samples(out / "heldout")]
    assert not train & (held | {pixel_digest(_pixels(s)) for s in moved})
    manifest = json.loads((out / "manifest.json").read_text())
    sources = [json.loads(s.members["json"])["source"] for s in pairs]
    for name, info in manifest["sources"].items():
        assert info["images"] == sources.count(name) and info["deformations_per_digit"] == [0, 1]
    assert manifest["sources"]["mnist"]["digits"] == 5000 - num_heldout
    assert (out / "grid.png").is_file()
    _check_pretokenized(out, pairs, tok_dir)


def _check_pretokenized(out, pairs, tok_dir) -> None:
    """Each tokens document is the on-the-fly document of its pair, in one of the two orders."""
    tok = TokenizerConfig(text="sentencepiece", image="vq", path=str(tok_dir))
    tokenizers = tok.build()
    by_order = {
        order: DocumentBuilder(tokenizers, DecodeOptions(8, 4.0, order, 0.5))
        for order in ("caption_first", "image_first")
    }
    raw = {s.key: s for s in pairs}
    orders = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one 28x28 image at a time: threads only slow the VQ down
    try:
        for sample in _samples(out / "pairs_tokens"):
            tokens = np.load(io.BytesIO(sample.members["tokens.npy"]))
            order = "image_first" if tokens[1] == tokenizers.vocab.boi else "caption_first"
            want = by_order[order].build("pairs", raw[sample.key], None)
            assert np.array_equal(tokens, want.tokens), sample.key
            assert np.array_equal(
                np.load(io.BytesIO(sample.members["modality.npy"])), want.modality
            )
            orders.append(order)
    finally:
        torch.set_num_threads(threads)
    assert len(orders) == 300 and set(orders) == {"caption_first", "image_first"}
    cfg = DataConfig(
        source="webdataset",
        seq_len=64,
        num_streams=2,
        num_workers=0,
        sources=[SourceConfig(str(out / "pairs_tokens"), "tokens")],
    )
    batch = cfg.build(1, 0, 1, 4, 4, tokenizer=tok).next()  # the training loader reads them
    assert sum(b.input_ids_BS.numel() for b in batch) == 4 * 64


def test_same_seed_same_corpus_other_seed_other_images(tmp_path):
    def corpus(seed, name):
        cfg = StudyCorpusConfig(
            output=str(tmp_path / name), pairs=40, seed=seed, heldout=100, tokenizers=""
        )
        info = build(cfg)
        members = lambda d: [(s.key, s.members) for s in _samples(tmp_path / name / d)]
        return info, members("pairs"), members("heldout_deformed")

    first, again, other = corpus(3, "a"), corpus(3, "b"), corpus(4, "c")
    assert first[1] == again[1] and first[0]["content_sha1"] == again[0]["content_sha1"]
    assert first[1] != other[1] and first[0]["content_sha1"] != other[0]["content_sha1"]
    assert first[2] == other[2]  # the held-out sets do not depend on the seed
    assert first[0]["pretokenized"] is None and not (tmp_path / "a" / "pairs_tokens").exists()


def test_a_deformation_equal_to_an_earlier_image_is_drawn_again():
    a, b = np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8)
    draws = iter([a, a.copy(), b])
    seen = {pixel_digest(a)}
    image, refused = draw_unique(lambda: next(draws), seen)
    assert np.array_equal(image, b) and refused == 2 and pixel_digest(b) in seen
    with pytest.raises(UserError, match="deform.alpha"):
        draw_unique(lambda: b, seen, max_tries=3)


def test_affine_part_equals_scipy_affine_transform():
    """With the elastic field off, deform() is the affine map its docstring names."""
    image = mnist()[0][7]
    cfg = DeformConfig(rotate=20, scale=0.2, shear=0.3, shift=3, alpha=0)
    got = deform(image, np.random.default_rng(5), cfg)
    rng = np.random.default_rng(5)  # the same draws, in deform's order
    angle, zoom = np.deg2rad(rng.uniform(-20, 20)), 1 + rng.uniform(-0.2, 0.2)
    shear, shift = rng.uniform(-0.3, 0.3), rng.uniform(-3, 3, size=2)
    forward = (
        zoom
        * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        @ np.array([[1, shear], [0, 1]])
    )
    matrix, centre = np.linalg.inv(forward), np.array([13.5, 13.5])
    want = affine_transform(
        image.astype(np.float32), matrix, centre - matrix @ (centre + shift), order=1, cval=0.0
    )
    assert np.array_equal(got, np.clip(np.rint(want), 0, 255).astype(np.uint8))
    still = DeformConfig(rotate=0, scale=0, shear=0, shift=0, alpha=0)
    assert np.array_equal(deform(image, np.random.default_rng(0), still), image)
    mild = partial(deform, image, np.random.default_rng(0), DeformConfig())
    assert not np.array_equal(mild(), mild())


@pytest.mark.parametrize(
    "args, key",
    [
        (["pairs=0"], "pairs=0"),
        (["heldout=5000"], "heldout=5000"),
        (["deform.sigma=0"], "deform.sigma=0"),
        (["deform.scale=1.5"], "deform.scale=1.5"),
        (["pairs_count=3"], "pairs_count"),
    ],
)
def test_bad_arguments_name_the_key(tmp_path, capsys, args, key):
    with pytest.raises(SystemExit) as exit_info:
        run_job("build_study_corpus.py", StudyCorpusConfig, build, [f"output={tmp_path}", *args])
    assert exit_info.value.code == 2 and key in capsys.readouterr().err


def test_a_tokenizer_folder_without_its_files_is_refused(tmp_path):
    cfg = StudyCorpusConfig(output=str(tmp_path / "o"), pairs=5, tokenizers=str(tmp_path))
    with pytest.raises(UserError, match=r"tokenizers=.* has no text.model and no vq.pt"):
        build(cfg)
    assert not (tmp_path / "o").exists()  # refused before writing anything
