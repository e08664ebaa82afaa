"""Schema validation of composed configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from hydra import compose, initialize_config_dir

from mm_moe.config import ConfigError, TrainConfig, from_dict, to_dict
from mm_moe.config.overrides import check_overrides
from mm_moe.config.schema import GROUPS
from mm_moe.train import CONFIG_DIR, build_config

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
        ({"ratee": 1}, "Valid keys at the top level: inner, maybe, names, rate, sizes"),
    ],
)
def test_from_dict_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert message in str(err.value)


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
