"""Data-pipeline throughput vs what training consumes, measured in one run.

    .venv/bin/python scripts/bench_data.py [--steps 30] [--experiment tiny_dense] [--smoke]

`--smoke`: 100 pairs and 30 texts, 4 steps, 2 JPEGs per core rate (a test runs it; the
figures mean nothing).

1. Builds a small img2dataset-like shard set in a temporary folder: image-text pairs (JPEG,
   96x64..128x96 photos-like noise) and text documents, mixed 3:1 as the example config does.
2. Pipeline: the webdataset loader with 2 dataloader workers, the tiny run's batch layout
   (global batch 16, seq_len 128, the bytes_grid stand-in tokenizers): tokens/s it produces.
3. Training: `python -m mm_moe.train experiment=<experiment>` on one process for `--steps`
   steps (its own metrics.jsonl): median tokens/s it consumes.
4. Prints the ratio (target: at least 10), and an estimate for the 1.4B configs per GPU:
   training consumption per H100 = peak bf16 FLOP/s x assumed MFU / training FLOPs per token
   of configs/model/moma_4t4i_1.4b.yaml at seq_len 4096, against the measured per-core rate of
   decoding a 512x512 JPEG to Chameleon-size images (1024 tokens) or of reading tokens shards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm_moe.data.config import DataConfig, SourceConfig  # noqa: E402
from mm_moe.tokenization.config import TokenizerConfig  # noqa: E402

H100_BF16_PEAK, ASSUMED_MFU = 989e12, 0.40
WORKERS_PER_GPU = 8  # e.g. a 96-core node with 8 GPUs, leaving cores for the trainer


def _jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    # Smooth noise compresses like a photo rather than like white noise.
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def build_shards(root: Path, num_pairs: int = 2000, num_texts: int = 600) -> list[SourceConfig]:
    rng = np.random.default_rng(0)
    words = [
        "a",
        "photo",
        "of",
        "the",
        "red",
        "green",
        "blue",
        "cat",
        "dog",
        "house",
        "tree",
        "on",
        "at",
        "in",
        "with",
        "small",
        "large",
    ]
    (root / "pairs").mkdir()
    with wds.ShardWriter(str(root / "pairs" / "p-%06d.tar"), maxcount=250, verbose=0) as sink:
        for i in range(num_pairs):
            size = [(96, 64), (128, 96), (64, 64), (80, 120)][i % 4]
            caption = " ".join(rng.choice(words, int(rng.integers(6, 20))))
            sink.write({"__key__": f"{i:09d}", "jpg": _jpeg(rng, size), "txt": caption})
    (root / "text").mkdir()
    with wds.ShardWriter(str(root / "text" / "t-%06d.tar"), maxcount=150, verbose=0) as sink:
        for i in range(num_texts):
            text = " ".join(rng.choice(words, int(rng.integers(50, 400))))
            sink.write({"__key__": f"{i:09d}", "txt": text})
    return [
        SourceConfig(str(root / "pairs"), "pairs", 3.0),
        SourceConfig(str(root / "text"), "text", 1.0),
    ]


def pipeline_tokens_per_s(sources, steps: int, workers: int = 2) -> float:
    cfg = DataConfig(
        source="webdataset", seq_len=128, num_streams=4, num_workers=workers, sources=sources
    )
    loader = cfg.build(0, 0, 1, 4, 16, tokenizer=TokenizerConfig())
    for _ in range(2):  # worker start-up and first shard opens
        loader.next()
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        tokens += sum(b.input_ids_BS.numel() for b in loader.next())
    rate = tokens / (time.perf_counter() - start)
    loader.close()
    return rate


def training_tokens_per_s(experiment: str, steps: int, threads: int = 2) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
        cmd = [
            sys.executable,
            "-m",
            "mm_moe.train",
            f"experiment={experiment}",
            f"trainer.max_steps={steps}",
            "trainer.log_interval=1",
            "checkpoint.interval=0",
            "logging.wandb.mode=disabled",
            "logging.progress=lines",
            "data.seq_len=128",
            f"trainer.run_dir={run_dir}",
        ]
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[min(3, len(rows) - 1) :])


def per_core_rates(num_jpegs: int = 20) -> dict[str, float]:
    """Tokens/s of one core: JPEG 512x512 -> Chameleon-size image (1024 codes + caption), and
    reading tokens shards (pre-tokenized)."""
    from mm_moe.tokenization.image_preprocess import preprocess

    rng = np.random.default_rng(1)
    jpegs = [_jpeg(rng, (640, 512)) for _ in range(num_jpegs)]
    start = time.perf_counter()
    for data in jpegs:
        preprocess(Image.open(io.BytesIO(data)), 512)
    decode = 1054 * len(jpegs) / (time.perf_counter() - start)
    doc = np.arange(4096, dtype=np.int32)
    out = io.BytesIO()
    with wds.TarWriter(out) as sink:
        for i in range(50):
            sink.write({"__key__": f"{i}", "tokens.npy": doc, "modality.npy": doc.astype(np.uint8)})
    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(out.getvalue())
        f.flush()
        from mm_moe.data.tar_reader import iter_raw_samples

        start = time.perf_counter()
        n = sum(len(np.load(io.BytesIO(s.members["tokens.npy"]))) for s in iter_raw_samples(f.name))
        read = n / (time.perf_counter() - start)
    return {"decode_512px_jpeg": decode, "read_tokens_shards": read}


def consumption_1_4b_per_gpu() -> float:
    from hydra import compose, initialize_config_dir

    from mm_moe.train import CONFIG_DIR, build_config

    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = build_config(compose("train", overrides=["model=moma_4t4i_1.4b"]))
    flops = cfg.model.with_vocab(65536 + 5 + 8192).flops_per_token(4096, cfg.moe)
    return H100_BF16_PEAK * ASSUMED_MFU / (sum(flops.values()) / len(flops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--experiment", default="tiny_dense")
    parser.add_argument("--smoke", action="store_true", help="100 pairs, 30 texts, 4 steps")
    args = parser.parse_args()
    sizes = {"num_pairs": 100, "num_texts": 30} if args.smoke else {}
    if args.smoke:
        args.steps = 4
    with tempfile.TemporaryDirectory() as tmp:
        sources = build_shards(Path(tmp), **sizes)
        produced = pipeline_tokens_per_s(sources, args.steps)
    # --smoke: one thread (a test beside other tests: two would wait on each other's cores)
    consumed = training_tokens_per_s(args.experiment, args.steps, 1 if args.smoke else 2)
    print(f"pipeline (2 workers, pairs:text 3:1, jpeg 64-128 px): {produced:,.0f} tokens/s")
    print(f"training ({args.experiment}, 1 process, seq_len 128): {consumed:,.0f} tokens/s")
    print(f"ratio: {produced / consumed:.1f}  (target >= 10)")
    gpu = consumption_1_4b_per_gpu()
    core = per_core_rates(2 if args.smoke else 20)
    print(
        f"1.4B estimate (moma_4t4i_1.4b, seq 4096, H100 at {ASSUMED_MFU:.0%} MFU): training "
        f"consumes {gpu:,.0f} tokens/s per GPU"
    )
    for name, rate in core.items():
        print(
            f"  {name}: {rate:,.0f} tokens/s per core -> ratio with {WORKERS_PER_GPU} workers "
            f"per GPU: {WORKERS_PER_GPU * rate / gpu:.1f}"
        )
    print("  (the VQ image encoder is not included: run it on the GPU or pre-tokenize offline)")


if __name__ == "__main__":
    main()
