"""`python -m mm_moe.plan`: counts equal the built model's, memory and warnings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm_moe.plan import main
from mm_moe.train import CONFIG_DIR

MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


@pytest.mark.parametrize("preset", MODELS)
def test_plan_counts_equal_built_model(preset, capsys):
    from hydra import compose, initialize_config_dir

    from mm_moe.train import build_config

    result = main([f"model={preset}", "cluster.nodes=1", "cluster.gpus_per_node=8"])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = build_config(compose("train", overrides=[f"model={preset}"]))
    with torch.device("meta"):
        model = cfg.model.with_vocab(65536 + 5 + 8192).build(cfg.moe)
    assert result["params_total"] == sum(p.numel() for p in model.parameters())
    expert = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".ffn.experts." in n and "ffn.experts.0." not in n and "ffn.experts.1." not in n
    )
    assert result["params_expert"] == expert
    assert "parameters:" in capsys.readouterr().out


def test_plan_warns_and_shards_experts():
    base = [
        "model=moma_4t4i_1.4b",
        "cluster.nodes=1",
        "cluster.gpus_per_node=8",
        "parallel.zero_stage=2",
        "trainer.global_batch_size=64",
        "trainer.micro_batch_size=1",
    ]
    ep1 = main([*base, "parallel.expert_parallel_size=1"])
    ep4 = main([*base, "parallel.expert_parallel_size=4"])
    assert ep4["memory_per_gpu"]["params_gib"] < ep1["memory_per_gpu"]["params_gib"]
    assert ep1["all_to_all_gib_per_gpu_per_step"] == 0 < ep4["all_to_all_gib_per_gpu_per_step"]
    bad = main([*base, "parallel.expert_parallel_size=8", "cluster.gpu_memory_gb=0.5"])
    assert any("not divisible by EP=8" in w for w in bad["warnings"])
    assert any("exceeds cluster.gpu_memory_gb" in w for w in bad["warnings"])


def test_plan_rejects_unknown_cluster_key():
    with pytest.raises(SystemExit):
        main(["cluster.nodez=2"])
