"""The demo pipeline end to end at toy size: corpus shards from packaged data -> trained
sentencepiece and VQ tokenizers -> MoMa training on the shards -> sampling an image and a
caption from the checkpoint."""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from tests.helpers import PYTHON, REPO, _env, metrics


def test_demo_corpus_tokenizers_training_and_sampling(tmp_path):
    from data_pipelines import build_demo_corpus

    corpus = tmp_path / "demo"
    counts = build_demo_corpus.build(
        build_demo_corpus.DemoCorpusConfig(
            output=str(corpus), heldout=40, crops_per_photo=1, interleaved_docs=12, shard_size=400
        )
    )
    assert counts["heldout"] == 40 and counts["interleaved"] == 12 and counts["pairs"] > 6000
    assert json.loads((corpus / "corpus.json").read_text()) == counts

    from mm_moe import train_image_tokenizer as train_image
    from mm_moe import train_text_tokenizer as train_text
    from mm_moe.tokenization.config import VQConfig

    tok = tmp_path / "tok"
    train_text.train(
        train_text.TrainTextConfig(
            output=str(tok), sources=[str(corpus / "text"), str(corpus / "pairs")], vocab_size=400
        )
    )
    report = train_image.train(
        train_image.TrainImageConfig(
            output=str(tok),
            sources=[str(corpus / "pairs")],
            heldout=[str(corpus / "heldout")],
            vq=VQConfig(codebook_size=32, code_dim=8, channels=16),
            steps=10,
            batch_size=16,
            max_images=200,
        )
    )
    assert report["heldout"]["images"] == 40
    assert {"text.model", "vq.pt", "vq.yaml", "metrics.json"} <= {p.name for p in tok.iterdir()}

    run_dir = tmp_path / "run"
    sources = (
        f"data.sources=[{{urls:{corpus}/pairs,format:pairs,weight:3}},"
        f"{{urls:{corpus}/interleaved,format:interleaved,weight:1}},"
        f"{{urls:{corpus}/text,format:text,weight:1}}]"
    )
    cmd = [
        PYTHON,
        "-m",
        "mm_moe.train",
        "experiment=demo",
        sources,
        f"tokenizer.path={tok}",
        f"eval.sources=[{{urls:{corpus}/heldout,format:pairs}}]",
        "eval.interval=3",
        f"trainer.run_dir={run_dir}",
        "trainer.max_steps=3",
        "trainer.log_interval=1",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4",
        "data.num_workers=0",
        "data.seq_len=64",
        "logging.wandb.mode=disabled",
        "checkpoint.interval=3",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir)
    assert len(rows) == 3 and "moe/l0/image/load_e0" in rows[-1]
    _check_step_3_against_a_recount(run_dir, rows[-1])

    from mm_moe.generate import GenerateConfig, run

    images = run(
        GenerateConfig(
            checkpoint=str(run_dir),
            prompt="a handwritten digit 3",
            mode="image",
            n=1,
            out=str(tmp_path / "samples"),
        )
    )
    png = Image.open(images[0]["images"][0])
    assert png.size == (28, 28)
    caption = run(
        GenerateConfig(
            checkpoint=str(run_dir), image=images[0]["images"][0], mode="text", max_new_tokens=8
        )
    )
    assert not caption[0]["images"]

    # mode=image with classifier-free guidance: the n images are the guided sampler's codes.
    import numpy as np

    from mm_moe.api import load_pretrained
    from mm_moe.errors import UserError
    from mm_moe.eval.text_to_image import sample_image_codes
    from mm_moe.generate import prompt_ids

    prompt = "a handwritten digit 3"
    guided = run(
        GenerateConfig(
            checkpoint=str(run_dir),
            prompt=prompt,
            mode="image",
            n=2,
            guidance=3.0,
            top_k=1,
            out=str(tmp_path / "guided"),
        )
    )
    model = load_pretrained(run_dir)
    tok = model.train_config.tokenizer.build()
    # The caption again, sampled without the KV cache (a forward over the whole prefix per
    # token) from the same seed: the same words.
    from mm_moe.sampling import SampleConfig, generate, split_output

    with Image.open(images[0]["images"][0]) as digit:
        ids = prompt_ids(tok, "", digit.copy(), "text")
    new = generate(model, tok.vocab, ids, tok.image.tokens_per_image, SampleConfig(8), cache=False)
    parts = split_output(new, tok.vocab)
    assert caption[0]["text"] == "".join(tok.text.decode(v) for k, v in parts if k == "text")
    ids = prompt_ids(tok, prompt, None, "image")
    want = sample_image_codes(model, tok, [ids, ids], 1.0, 1, 0, 3.0)
    for result, codes in zip(guided, want):
        got = np.asarray(Image.open(result["images"][0]))
        np.testing.assert_array_equal(got, np.asarray(tok.image.decode(codes)))
    with pytest.raises(UserError, match="needs mode=image"):
        GenerateConfig(checkpoint=str(run_dir), guidance=3.0)
    for bad, message in [
        (dict(top_k=-3), "top_k=-3 must be >= 0"),
        (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(n=0), "n=0 must be >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
    ]:
        with pytest.raises(UserError, match=message):
            GenerateConfig(checkpoint=str(run_dir), **bad)


def _check_step_3_against_a_recount(run_dir, row: dict) -> None:
    """Step 3's token counts from the run's own loader, and its held-out losses from the
    step-3 checkpoint on the held-out batches, recomputed here."""
    import torch

    from mm_moe.api import load_pretrained
    from mm_moe.eval.heldout import HeldoutEval, heldout_batches

    model = load_pretrained(run_dir)
    cfg = model.train_config
    t = cfg.trainer
    loader = cfg.data.build(t.seed, 0, 1, t.micro_batch_size, t.global_batch_size, cfg.tokenizer)
    step3 = [loader.next() for _ in range(3)][-1]
    for m, name in enumerate(("text", "image")):
        count = sum(int((b.loss_mask_BS & (b.target_modality_ids_BS == m)).sum()) for b in step3)
        assert row[f"tokens_{name}"] == count > 0, name
    batches = heldout_batches(cfg.eval, cfg.data, cfg.tokenizer, 0, 1, t.micro_batch_size)
    want = HeldoutEval(batches, torch.device("cpu"))(model)
    for key in ("eval/loss_text", "eval/loss_image", "eval/tokens_image"):
        assert row[key] == pytest.approx(want[key], rel=1e-5), key
