"""Tiny webdataset shards for the data tests, built in-process (nothing is downloaded)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

WORDS = [
    "red",
    "green",
    "blue",
    "small",
    "large",
    "round",
    "square",
    "bright",
    "dark",
    "striped",
    "dotted",
    "plain",
]


def image_bytes(seed: int, size=(16, 16), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def caption(seed: int) -> str:
    rng = np.random.default_rng([seed, 7])
    return " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))


def write_shards(out_dir: Path, samples: list[dict], per_shard: int, prefix: str = "shard") -> str:
    """Samples (webdataset dicts) into out_dir/prefix-%06d.tar; returns the brace pattern."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    num = (len(samples) + per_shard - 1) // per_shard
    return str(out_dir / f"{prefix}-{{{0:06d}..{num - 1:06d}}}.tar")


def pairs(count: int, start: int = 0) -> list[dict]:
    return [
        {"__key__": f"p{i:05d}", "png": image_bytes(i), "txt": caption(i), "json": {"i": i}}
        for i in range(start, start + count)
    ]


def texts(count: int, start: int = 0) -> list[dict]:
    return [
        {"__key__": f"t{i:05d}", "txt": f"doc {i}: " + caption(i)}
        for i in range(start, start + count)
    ]


def interleaved(count: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + count):
        content = [
            {"type": "text", "text": caption(i)},
            {"type": "image", "member": "0.png"},
            {"type": "text", "text": caption(i + 1)},
            {"type": "image", "member": "1.png"},
        ]
        out.append(
            {
                "__key__": f"d{i:05d}",
                "json": json.dumps({"content": content}).encode(),
                "0.png": image_bytes(10_000 + i),
                "1.png": image_bytes(20_000 + i),
            }
        )
    return out


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members, in this order (for planted layout defects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def user_config_dir(root: Path, name: str, body: str) -> Path:
    """A user's own config dir holding data/NAME.yaml that starts from the project's
    `webdataset` data config (for `--config-dir DIR data=NAME`)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / f"{name}.yaml").write_text("defaults:\n  - webdataset\n\n" + body)
    return root


def with_config_dir(config_dir: Path, nproc: int = 1) -> list[str]:
    """A `launcher` for tests.helpers.train: Hydra wants --config-dir before the overrides."""
    from tests.helpers import PYTHON, TORCHRUN

    if nproc == 1:
        return [PYTHON, "-m", "mm_moe.train", "--config-dir", str(config_dir)]
    return [
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "mm_moe.train",
        "--config-dir",
        str(config_dir),
    ]
