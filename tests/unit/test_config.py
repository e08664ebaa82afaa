"""Schema validation of composed configs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pytest
import torch
from hydra import compose, initialize_config_dir

from mm_moe.config import ConfigError, TrainConfig, from_dict, to_dict
from mm_moe.config.overrides import check_overrides
from mm_moe.config.schema import GROUPS
from mm_moe.train import CONFIG_DIR, build_config
from mm_moe.trainer.config import TrainerConfig

ENTRY = (*GROUPS, "experiment")


@dataclass
class Inner:
    k: int = 1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    rate: float = 0.5
    names: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    maybe: str | None = None
    parts: list[Literal["ffn", "norms"]] | None = None
    either: int | list[int] = 0


def test_from_dict_converts_and_nests():
    out = from_dict(
        Outer,
        {
            "inner": {"k": 3, "mode": "b"},
            "rate": "1e-3",
            "names": ["x"],
            "sizes": {"text": 4},
            "maybe": None,
        },
    )
    assert out == Outer(Inner(3, "b"), 1e-3, ["x"], {"text": 4}, None)
    assert to_dict(out)["inner"] == {"k": 3, "mode": "b"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"kk": 1}}, "unknown config key 'inner.kk'. Did you mean 'k'?"),
        ({"inner": {"mode": "c"}}, "inner.mode='c' is not valid; choose one of 'a', 'b'"),
        ({"inner": {"k": "three"}}, "inner.k='three' is not valid; expected an integer"),
        ({"inner": {"k": True}}, "inner.k=True is not valid"),
        ({"rate": "fast"}, "rate='fast' is not valid; expected a number"),
        ({"sizes": {"text": 1.5}}, "sizes.text=1.5 is not valid"),
        ({"ratee": 1}, "Valid keys at the top level: either, inner, maybe, names, parts, rate"),
        # an optional value's own error: which item, and the choices
        ({"parts": ["foo"]}, "parts[0]='foo' is not valid; choose one of 'ffn', 'norms'"),
        ({"parts": "ffn"}, "parts must be a list, got 'ffn'"),
        ({"either": "x"}, "either='x' is not valid; expected int | a list of int"),
    ],
)
def test_from_dict_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert message in str(err.value)


def test_a_missing_required_key_and_an_unreadable_value_are_named(capsys):
    """`key=value` commands: a key without a default names itself (not a Python signature
    error); a value YAML cannot read (`glob=*.txt` is an alias there) names the argument and
    says to quote it, instead of a YAML traceback."""
    from mm_moe.cli import parse_args
    from mm_moe.export import ExportConfig

    with pytest.raises(SystemExit) as exit_:
        parse_args(ExportConfig, ["out=/tmp/x"], "mm_moe.export")
    assert exit_.value.code == 2
    assert "mm_moe.export: error: source=... is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(ExportConfig, ["source=a", "out=*.txt"], "mm_moe.export")
    err = capsys.readouterr().err
    assert "cannot read 'out=*.txt'" in err and "quote the value" in err
    assert parse_args(ExportConfig, ["source=a", 'out="*.txt"'], "mm_moe.export").out == "*.txt"


def test_shards_given_to_a_source_that_does_not_read_them_are_refused():
    """data.sources with data.source left at synthetic_patterns (a data config without
    `defaults: [webdataset]`) trained on synthetic data without a word, the shards unopened."""
    sources = [{"urls": "/no/such/shards", "format": "pairs"}]
    with pytest.raises(ConfigError, match=r"data.sources is set but data.source=synthetic"):
        from_dict(TrainConfig, {"data": {"source": "synthetic_patterns", "sources": sources}})
    with pytest.raises(ConfigError, match=r"data.source=webdataset needs data.sources"):
        from_dict(TrainConfig, {"data": {"source": "webdataset"}})


def test_post_init_errors_are_config_errors():
    with pytest.raises(ConfigError, match="trainer.micro_batch_size"):
        from_dict(TrainConfig, {"trainer": {"global_batch_size": 6, "micro_batch_size": 4}})


@pytest.mark.parametrize(
    "argv, ok",
    [
        (["trainer.max_steps=5"], True),
        (["experiment=tiny_dense", "model=dense_1b"], True),
        (["+foo=1", "hydra.run.dir=x", "-m", "--config-dir", "d"], True),
        (["trainer.max_stepz=5"], False),
        (["optimm.lr=1"], False),
        (["logging.wandb.mod=offline"], False),
    ],
)
def test_override_prescan(argv, ok):
    if ok:
        check_overrides(argv, TrainConfig, ENTRY)
    else:
        with pytest.raises(ConfigError, match="unknown config key"):
            check_overrides(argv, TrainConfig, ENTRY)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("traner.max_steps=5", "'traner' is not a key at the top level. Did you mean 'trainer'?"),
        ("logging.wandbb.mode=offline", "'wandbb' is not a key under 'logging'. Did you mean"),
    ],
)
def test_a_misspelt_group_in_a_key_is_named_with_its_neighbours(arg, message):
    """Before: "Valid keys under 'traner': (none: not a mapping)", with no suggestion."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_overrides([arg], TrainConfig, ENTRY)


EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = build_config(compose("train", overrides=[f"experiment={experiment}"]))
    assert cfg.name == experiment
    assert cfg.checkpoint.dir == f"runs/{experiment}/checkpoints"
    if experiment == "tiny_moma":
        assert cfg.moe.experts_per_modality == {"text": 4, "image": 4}


def test_dense_1b_preset_is_about_one_billion():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = build_config(compose("train", overrides=["experiment=dense_1b"]))
    total = cfg.model.num_params()["total"]
    assert 0.9e9 < total < 1.1e9, total


def test_checked_overrides_become_add_or_override():
    argv = [
        "experiment=tiny_moma",
        "model.untie=[ffn]",
        "moe.experts_per_modality.text=2",
        "+custom=1",
        "-m",
    ]
    assert check_overrides(argv, TrainConfig, ENTRY) == [
        "experiment=tiny_moma",
        "++model.untie=[ffn]",
        "++moe.experts_per_modality.text=2",
        "+custom=1",
        "-m",
    ]


@pytest.mark.parametrize("preset", MODELS)
def test_every_model_preset_counts_its_parameters_exactly(preset):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = build_config(compose("train", overrides=[f"model={preset}"]))
    model_cfg = cfg.model.with_vocab(1000)
    with torch.device("meta"):  # shapes only: the 1.4B presets cost no memory
        model = model_cfg.build(cfg.moe)
    assert model_cfg.num_params(cfg.moe)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("nproc, micro, ep", [(1, 16, 1), (2, 8, 2), (4, 4, 4), (8, 2, 4)])
def test_make_train_sizes_follow_the_process_count(nproc, micro, ep):
    """`make train NPROC=n`: the micro-batch is the global batch / n, the expert-parallel size
    the largest that divides n and the 4 experts of each group (make train passes EP=0)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = build_config(
            compose("train", overrides=["experiment=demo", "parallel.expert_parallel_size=0"])
        )
    resolved = cfg.for_world(nproc)
    assert resolved.trainer.micro_batch_size == micro
    assert resolved.trainer.grad_accumulation_steps(nproc) == 1
    assert resolved.parallel.expert_parallel_size == ep
    # an explicit EP is kept (make train EP=2)
    pinned = replace(cfg, parallel=replace(cfg.parallel, expert_parallel_size=2))
    assert pinned.for_world(nproc if nproc > 1 else 2).parallel.expert_parallel_size == 2


def test_make_train_defaults_nproc_to_gpus_or_two_and_passes_auto_ep():
    import subprocess

    repo = Path(CONFIG_DIR).parent
    dry = subprocess.run(
        ["make", "-n", "-W", "setup", "train"], cwd=repo, capture_output=True, text=True
    ).stdout
    line = next(x for x in dry.splitlines() if "torchrun" in x)
    gpus = torch.cuda.device_count()
    assert f"--nproc_per_node={gpus or 2} " in line
    assert "parallel.expert_parallel_size=0" in dry


def test_micro_batch_zero_needs_a_global_batch_divisible_by_ranks():
    cfg = TrainConfig(trainer=TrainerConfig(global_batch_size=6, micro_batch_size=0))
    with pytest.raises(ValueError, match="not a multiple of the 4 ranks"):
        cfg.for_world(4)
    assert cfg.for_world(3).trainer.micro_batch_size == 2


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from mm_moe.parallel import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="local rank 1 has no GPU: this node has 1 GPU"):
        distributed.init_distributed("auto", 60)


# ---- keys that change nothing are refused (docs/configuration.md: exit status 2) ----
_MOMA = {"experts_per_modality": {"text": 2, "image": 2}}
_TC = {**_MOMA, "router": "token_choice", "score": "softmax"}


@pytest.mark.parametrize(
    "moe, message",
    [
        # the straight-through gate replaces only a renormalized token-choice top-1 gate
        ({**_TC, "top_k": 2, "top1_straight_through": False}, "moe.top1_straight_through=false"),
        ({**_TC, "granularity": 2, "top1_straight_through": False}, "granularity = 2"),
        ({**_TC, "renormalize": False, "top1_straight_through": False}, "renormalize=false"),
        ({**_MOMA, "top1_straight_through": False}, "moe.router=expert_choice"),
        ({**_MOMA, "cosine_router_scale": 5.0}, "moe.cosine_router_scale=5.0 has no effect"),
        ({**_TC, "aux_router_hidden": 16}, "moe.aux_router_hidden=16 has no effect"),
        ({**_TC, "aux_router_coef": 0.5}, "moe.aux_router_coef=0.5 has no effect"),
    ],
)
def test_moe_keys_that_change_nothing_are_refused(moe, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(TrainConfig, {"moe": moe})


@pytest.mark.parametrize(
    "moe",
    [
        {**_TC, "top1_straight_through": False},  # renormalized top-1: the gradient changes
        {**_MOMA, "router_logits": "cosine", "cosine_router_scale": 5.0},
        {**_MOMA, "aux_router_hidden": 16, "aux_router_coef": 0.5},  # expert choice
        {**_TC, "aux_router_hidden": 64, "aux_router_coef": 1.0},  # the defaults, as YAML
    ],
)
def test_the_same_keys_are_accepted_where_they_act(moe):
    from_dict(TrainConfig, {"moe": moe})


@pytest.mark.parametrize(
    "mod", [{"capacity": 0.25}, {"aux_router_coef": 2.0}, {"aux_router_hidden": 8, "layers": []}]
)
def test_mixture_of_depths_keys_without_its_layers_are_refused(mod):
    with pytest.raises(ConfigError, match=r"model\.mod\.\w+=\S+ has no effect .*mod.layers=\[\]"):
        from_dict(TrainConfig, {"model": {"mod": mod}})
    cfg = from_dict(TrainConfig, {"model": {"mod": {**mod, "layers": [1]}}})
    assert cfg.model.mod.layers == [1]


def _built_ffns(cfg: TrainConfig) -> list[str]:
    model = cfg.model.with_vocab(100)
    with torch.device("meta"):
        net = model.build(cfg.moe)
    return [type(block.ffn).__name__ for block in net.layers]


@pytest.mark.parametrize(
    "moe, says",
    [
        (_MOMA, "already per modality (MoMa)"),
        ({"experts_per_modality": {"mixed": 4}}, "one 'mixed' expert group is shared"),
        ({**_MOMA, "layers": [0, 1, 2, 3]}, "already per modality"),  # every layer listed
    ],
)
def test_untie_ffn_where_every_layer_is_moe_is_refused(moe, says):
    """model.untie=[ffn] gives per-modality copies to dense FFNs only (model/block.py)."""
    with pytest.raises(ConfigError, match=r"model.untie=\[ffn\] has no effect") as err:
        from_dict(TrainConfig, {"model": {"untie": ["ffn"]}, "moe": moe})
    assert says in str(err.value)
    if "mixed" in moe["experts_per_modality"]:
        assert "MoMa groups already" not in str(err.value)


@pytest.mark.parametrize("groups", [_MOMA, {"experts_per_modality": {"mixed": 4}}])
def test_untie_ffn_with_some_dense_layers_unties_them(groups):
    moe = {**groups, "layers": [0, 2]}
    cfg = from_dict(TrainConfig, {"model": {"untie": ["ffn"]}, "moe": moe})
    assert _built_ffns(cfg) == ["MoELayer", "ModalityFFN", "MoELayer", "ModalityFFN"]


def test_mixing_groups_from_an_overlay_and_a_preset_names_the_deletions_that_work(tmp_path):
    """An experiment overlay's moe.experts_per_modality merges into the preset chosen on the
    command line: the message names the deletions, and they compose."""
    from mm_moe.config.validate import to_dict as plain

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /moe: moma_4t4i_tc\n"
        "moe:\n  experts_per_modality: {text: 2, image: 4}\n"
    )
    base = [f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine", "moe=mixed8_ec"]
    deletions = ["~moe.experts_per_modality.image", "~moe.experts_per_modality.text"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        with pytest.raises(ConfigError) as err:
            build_config(compose("train", overrides=base))
        cfg = build_config(compose("train", overrides=[*base, *deletions]))
    message = str(err.value)
    assert " ".join(deletions) in message and "choose the preset" not in message
    assert "~moe.experts_per_modality.mixed" in message and "overlay" in message
    assert plain(cfg.moe)["experts_per_modality"] == {"mixed": 8}


def test_a_saved_config_with_keys_that_changed_nothing_still_loads():
    """Checkpoints written before these keys were refused: the keys are dropped (defaults),
    which changes nothing, so generate, export, the upcycle and load_pretrained still read
    them."""
    from mm_moe.config.legacy import upgrade_saved_config

    saved = to_dict(TrainConfig())
    saved["moe"].update(
        experts_per_modality={"text": 2, "image": 2},
        router="token_choice",
        top_k=2,
        top1_straight_through=False,
        cosine_router_scale=5.0,
        aux_router_hidden=16,
        aux_router_coef=0.5,
    )
    saved["model"]["mod"].update(capacity=0.25, aux_router_coef=2.0)
    saved["model"]["untie"] = ["ffn", "norms"]
    with pytest.raises(ConfigError):
        from_dict(TrainConfig, saved)
    cfg = from_dict(TrainConfig, upgrade_saved_config(saved))
    assert cfg.model.untie == ["norms"] and cfg.moe.top_k == 2
    assert cfg.moe.cosine_router_scale == 10.0 and cfg.model.mod.capacity == 0.5
    # where a key acts it is kept
    saved["moe"].update(top_k=1, router_logits="cosine", top1_straight_through=False)
    saved["moe"].update(cosine_router_scale=5.0, layers=[0])
    saved["model"]["untie"] = ["ffn"]
    kept = from_dict(TrainConfig, upgrade_saved_config(saved))
    assert not kept.moe.top1_straight_through and kept.moe.cosine_router_scale == 5.0
    assert kept.model.untie == ["ffn"]


def test_a_dense_model_warns_about_moe_keys_but_not_the_kernel_choice(caplog):
    """Without experts, MoE keys set away from their defaults change nothing: a warning names
    them; moe.gemm, a kernel choice scripts set for every arm (the study's dense runs), is
    left out of it."""
    from mm_moe.model.moe.config import MoEConfig

    with caplog.at_level("WARNING", logger="mm_moe"):
        MoEConfig(gemm="loop")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="mm_moe"):
        MoEConfig(gemm="loop", top_k=2)
    assert "moe.top_k=2 set, but moe.experts_per_modality is empty" in caplog.text
    assert "gemm" not in caplog.text


def test_an_experiment_overlay_without_its_package_line_is_named(tmp_path):
    """Without `# @package _global_` Hydra nests the overlay under `experiment` and the error
    said "unknown config key 'experiment'": the missing line is named."""
    from mm_moe.cli import compose
    from mm_moe.errors import UserError

    (tmp_path / "experiment").mkdir()
    body = "defaults:\n  - override /model: tiny_dense\nname: mine\n"
    (tmp_path / "experiment" / "mine.yaml").write_text(body)
    with pytest.raises(
        UserError, match=r"mine.yaml: .*must begin with the line `# @package _global_`"
    ):
        compose(["experiment=mine"], config_dir=str(tmp_path))
    # Hydra reads the header from the first lines only: after another comment it is none
    (tmp_path / "experiment" / "mine.yaml").write_text("# mine\n# @package _global_\n" + body)
    with pytest.raises(UserError, match=r"first, before any other comment"):
        compose(["experiment=mine"], config_dir=str(tmp_path))
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\n" + body)
    assert compose(["experiment=mine"], config_dir=str(tmp_path)).name == "mine"
