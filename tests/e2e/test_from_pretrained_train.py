"""A Chameleon imported and upcycled into MoMa trains for 3 steps under torchrun with expert
parallelism 2 on the demo shards, tokenized on the fly by the source's own tokenizers: its
text tokenizer.json and its VQGAN, whose codes land on Chameleon's image-token ids."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import yaml

from mm_moe.cli import compose
from mm_moe.tokenization.config import TokenizerConfig
from mm_moe.upcycle.hf_import import chameleon_image_ids
from mm_moe.upcycle_command import run as upcycle
from tests.helpers import TORCHRUN, _env, metrics
from tests.hf_fixtures import make_hf_chameleon


def test_upcycled_chameleon_trains_on_shards_with_its_own_tokenizers(
    tmp_path, demo_assets, monkeypatch
):
    _, heldout = demo_assets
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(heldout.parent)  # configs/data/demo.yaml's urls
    monkeypatch.chdir(tmp_path)
    make_hf_chameleon(tmp_path / "chameleon")
    up = tmp_path / "moma"
    assert (
        upcycle(
            [f"source={tmp_path / 'chameleon'}", "source_format=hf", f"out={up}"]
            + ["moe=moma_4t4i_tc"]
        )
        == 0
    )

    # The batches training reads: images as the source's image-token ids, text by its tokenizer.
    overlay = yaml.safe_load((up / "experiment" / "upcycled.yaml").read_text())
    tokenizer = TokenizerConfig(**overlay["tokenizer"])
    assert (tokenizer.text, tokenizer.image) == ("hf", "chameleon")
    data = compose(["data=demo", "data.num_workers=0"]).data
    batch = data.build(0, 0, 1, 8, 8, tokenizer=tokenizer).next()[0]
    ids = batch.input_ids_BS.numpy()
    image = batch.modality_ids_BS.numpy() == 1
    source_ids = chameleon_image_ids(
        json.loads((tmp_path / "chameleon" / "config.json").read_text())
    )
    assert image.any() and (~image).any()
    assert np.isin(ids[image], source_ids).all()
    assert not np.isin(ids[~image], source_ids).any()

    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "mm_moe.train"]
    cmd += ["experiment=upcycled", "data=demo", f"checkpoint.resume={up}", "trainer.max_steps=3"]
    cmd += ["parallel.expert_parallel_size=2", "logging.wandb.mode=disabled", "data.num_workers=0"]
    cmd += [
        "trainer.log_interval=1",
        f"trainer.run_dir={tmp_path / 'run'}",
        "--config-dir",
        str(up),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss_text"]) and np.isfinite(r["loss_image"]) for r in rows)
