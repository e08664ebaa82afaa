"""`python -m mm_moe.plan`: counts equal the built model's, memory and warnings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mm_moe.plan import main
from mm_moe.train import CONFIG_DIR
from mm_moe.utils import units

MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


@pytest.mark.parametrize("preset", MODELS)
def test_plan_counts_equal_built_model(preset, capsys):
    from hydra import compose, initialize_config_dir

    from mm_moe.train import build_config

    result = main([f"model={preset}", "cluster.nodes=1", "cluster.gpus_per_node=8"])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = build_config(compose("train", overrides=[f"model={preset}"]))
    # The tiny presets take their vocabulary from the data, as training builds it (325 ids).
    vocab = cfg.model.vocab_size or cfg.data.vocab(cfg.tokenizer).size
    assert result["vocab_size"] == vocab
    with torch.device("meta"):
        model = cfg.model.with_vocab(vocab).build(cfg.moe)
    assert result["params_total"] == sum(p.numel() for p in model.parameters())
    expert = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".ffn.experts." in n and "ffn.experts.0." not in n and "ffn.experts.1." not in n
    )
    assert result["params_expert"] == expert
    printed = capsys.readouterr().out
    assert f"parameters: {units.count(result['params_total'])} total" in printed
    assert "0.000B" not in printed and " 0.00 GiB" not in printed.split("all-to-all")[0]


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
    small = main([*base, "parallel.expert_parallel_size=4", "cluster.gpu_memory_gb=0.5"])
    assert any("exceeds cluster.gpu_memory_gb" in w for w in small["warnings"])


def test_plan_refuses_a_layout_training_refuses(capsys):
    """3 + 5 experts at EP=2, EP=4 on 6 GPUs, EP without MoE: exit 2 with every reason, no
    memory figures for a split that cannot exist (1.5 experts per rank)."""
    base = ["model=moma_4t4i_1.4b", "cluster.nodes=1", "trainer.global_batch_size=48"]
    odd = ["moe.experts_per_modality.text=3", "moe.experts_per_modality.image=5"]
    for args, reasons in (
        (
            [*odd, "cluster.gpus_per_node=8", "parallel.expert_parallel_size=2"],
            [
                "group 'text' has 3 experts, not divisible by EP=2",
                "group 'image' has 5 experts, not divisible by EP=2",
            ],
        ),
        (
            ["cluster.gpus_per_node=6", "parallel.expert_parallel_size=4"],
            [
                "parallel.expert_parallel_size=4 does not divide the world size 6",
            ],
        ),
        (
            ["model=dense_1b", "cluster.gpus_per_node=8", "parallel.expert_parallel_size=2"],
            [
                "parallel.expert_parallel_size=2 without MoE layers",
            ],
        ),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*base, *args])
        out = capsys.readouterr()
        assert exit_.value.code == 2 and "memory per GPU" not in out.out
        assert "training refuses this layout" in out.err
        assert all(reason in out.err for reason in reasons), out.err


def test_plan_sizes_state_as_training_keeps_it():
    """bf16 at ZeRO-0 runs DeepSpeed's ZeRO-1 optimizer (state sharded over data-parallel
    ranks), fp32 keeps 4-byte weights and gradients and 8 bytes of moments."""
    base = ["model=moma_4t4i_1.4b", "cluster.nodes=1", "cluster.gpus_per_node=8"]
    plans = {
        (p, z): main([*base, f"trainer.precision={p}", f"parallel.zero_stage={z}"])
        for p in ("bf16", "fp32")
        for z in (0, 1)
    }
    mem = {key: plan["memory_per_gpu"] for key, plan in plans.items()}
    assert mem["bf16", 0] == mem["bf16", 1]
    assert mem["fp32", 0]["optimizer_gib"] == pytest.approx(8 * mem["fp32", 1]["optimizer_gib"])
    assert mem["fp32", 0]["params_gib"] == pytest.approx(2 * mem["bf16", 0]["params_gib"])
    n = plans["fp32", 0]["params_total"]
    assert mem["fp32", 0]["optimizer_gib"] == pytest.approx(8 * n / 2**30)


def test_plan_takes_the_vocabulary_from_the_configured_data(tmp_path, capsys):
    """A data vocabulary that cannot be read here (tokenizer files elsewhere) falls back to
    the published size with a warning; cluster.data_vocab_size sets it."""
    args = ["experiment=demo", f"tokenizer.path={tmp_path}"]
    missing = main(args)
    assert missing["vocab_size"] == 65536 + 5 + 8192
    assert any("cluster.data_vocab_size" in w for w in missing["warnings"])
    assert "text.model not found" in capsys.readouterr().out
    given = main([*args, "cluster.data_vocab_size=1000"])
    assert given["vocab_size"] == 1000 and not given["warnings"]
    assert main(["model=tiny_moma", "data.synthetic.text_vocab_size=500"])["vocab_size"] == 569
    # the synthetic source makes its own ids: a tokenizer given is said unread, as training does
    tokenizer = ["tokenizer.text=sentencepiece", f"tokenizer.path={tmp_path}"]
    unread = main(["experiment=tiny_moma", "cluster.gpus_per_node=1", *tokenizer])
    assert any("synthetic_patterns makes its own token ids" in w for w in unread["warnings"])


def test_plan_rejects_unknown_cluster_key(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["cluster.nodez=2"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "mm_moe.plan: error: unknown config key 'cluster.nodez'" in err
    assert "Did you mean 'nodes'?" in err


def _tiny_model(d_model: int, ffn: int, kv_heads: int, layers: int, seq_len: int):
    """The small decoders whose saved tensors the activation estimates are checked against."""
    from mm_moe.model.config import ModelConfig

    return ModelConfig(
        vocab_size=64,
        d_model=d_model,
        n_layers=layers,
        n_heads=4,
        n_kv_heads=kv_heads,
        ffn_hidden=ffn,
        max_seq_len=seq_len,
    )


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_activation_estimate_matches_the_saved_tensors_measured(mode):
    """plan_memory's per-layer formula (fp32 elements on CPU) against what the blocks keep
    for backward, measured with a saved-tensor hook (two depths: per-layer difference)."""
    from mm_moe.model.moe.config import MoEConfig
    from mm_moe.parallel.checkpointing import apply_activation_checkpointing
    from mm_moe.plan_memory import activation_bytes
    from tests.unit.test_memory import _saved_bytes

    B, S = 2, 128
    for d, f, kv in ((64, 176, 2), (96, 352, 4)):
        measured = []
        for layers in (1, 3):
            cfg = _tiny_model(d, f, kv, layers, S)
            torch.manual_seed(0)
            model = cfg.build()
            apply_activation_checkpointing(model, mode)
            ids = torch.randint(0, 64, (B, S))
            measured.append(_saved_bytes(lambda m=model, x=ids: m(x, return_hidden=True))[0])
        per_layer = (measured[1] - measured[0]) / 2
        one = _tiny_model(d, f, kv, 1, S)
        want = activation_bytes(one, MoEConfig(), B * S, mode, 4, fp32_norms=False, peak=False)
        assert per_layer == pytest.approx(want, rel=0.1), (d, f, kv)


def test_gpu_check_step_is_planned_within_60_gib(capsys):
    """The 1.4B MoMa step of scripts/gpu_check.py (4 x 4096 tokens, vocabulary 73,736) on
    one GPU: the chunked loss alone brings it under 60 GiB; checkpointing lower still."""
    args = [
        "model=moma_4t4i_1.4b",
        "data=synthetic_patterns",
        "data.seq_len=4096",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=4",
        "cluster.nodes=1",
        "cluster.gpus_per_node=1",
    ]
    totals = {}
    for mode in ("none", "selective", "full"):
        result = main([*args, f"trainer.activation_checkpointing={mode}"])
        totals[mode] = result["memory_per_gpu"]["total_gib"]
        assert result["memory_per_gpu"]["logits_gib"] < 1.5  # 22.5 GiB unchunked
    assert totals["full"] < totals["selective"] < totals["none"] <= 60, totals


def test_moe_activation_estimate_matches_the_saved_tensors_measured():
    from mm_moe.model.moe.config import MoEConfig
    from mm_moe.plan_memory import activation_bytes
    from tests.unit.test_memory import _saved_bytes

    B, S, d, f = 2, 128, 64, 176
    groups = {"text": 2, "image": 2}
    for moe in (
        MoEConfig(experts_per_modality=groups, gemm="loop"),
        MoEConfig(experts_per_modality=groups, router="token_choice", top_k=2, gemm="loop"),
    ):
        measured = []
        for layers in (1, 3):
            cfg = _tiny_model(d, f, 2, layers, S)
            torch.manual_seed(0)
            model = cfg.build(moe)
            ids, mods = torch.randint(0, 64, (B, S)), (torch.rand(B, S) < 0.5).long()
            measured.append(
                _saved_bytes(lambda m=model, x=ids, y=mods: m(x, y, return_hidden=True))[0]
            )
        one = replace(cfg, n_layers=1)
        want = activation_bytes(one, moe, B * S, "none", 4, fp32_norms=False, peak=False)
        assert (measured[1] - measured[0]) / 2 == pytest.approx(want, rel=0.1), moe.router


def test_plan_reads_the_users_own_config_dir(tmp_path):
    """--config-dir as the training command takes it: the user's own experiment is planned."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny_moma\n"
        "name: mine\nmodel: {d_model: 96, n_layers: 3}\n"
    )
    got = main(["--config-dir", str(tmp_path), "experiment=mine", "cluster.gpus_per_node=2"])
    builtin = main(["model=tiny_moma", "model.d_model=96", "model.n_layers=3"])
    assert (
        got["params_total"] == builtin["params_total"] != main(["model=tiny_moma"])["params_total"]
    )


def test_units_read_at_every_scale():
    """Tiny configs printed as 0.000B parameters and 0.00 GiB of memory."""
    assert [units.count(n) for n in (512, 871_000, 279_700_000, 1_371_000_000)] == [
        "512",
        "871K",
        "279.7M",
        "1.371B",
    ]
    assert units.flop(5.36e6) == "5.36 MFLOP" and units.flop(2.13e9) == "2.13 GFLOP"
    assert units.count(999_999) == "1M" and units.flop(999.9e6) == "1 GFLOP"  # not 1000K
    assert units.gib(25.67) == "25.67 GiB" and units.gib(26.43 / 1024) == "26.43 MiB"
