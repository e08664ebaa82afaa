"""The fault-tolerance keys and the step guard's decisions, without processes."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir

from mm_moe.config import ConfigError, TrainConfig, from_dict, to_dict
from mm_moe.config.overrides import check_overrides
from mm_moe.config.schema import GROUPS
from mm_moe.train import CONFIG_DIR, build_config
from mm_moe.trainer.config import SpikeConfig, TrainerConfig
from mm_moe.trainer.guard import StepGuard, TrainingHalted
from mm_moe.trainer.spikes import SpikeDetector
from mm_moe.utils.faults import parse


def test_checkpoint_async_key_on_the_command_line_and_in_yaml():
    argv = check_overrides(
        ["checkpoint.async=true", "checkpoint.on_write_error=continue"],
        TrainConfig,
        (*GROUPS, "experiment"),
    )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = build_config(compose(config_name="train", overrides=argv))
    assert cfg.checkpoint.async_save is True and cfg.checkpoint.on_write_error == "continue"
    assert to_dict(cfg)["checkpoint"]["async"] is True  # the saved config uses the key
    assert from_dict(TrainConfig, {"checkpoint": {"async": True}}).checkpoint.async_save
    with pytest.raises(ConfigError, match="checkpoint.async_save"):
        from_dict(TrainConfig, {"checkpoint": {"async_save": True}})
    with pytest.raises(ConfigError, match="'skip', 'stop'"):
        from_dict(TrainConfig, {"trainer": {"on_nonfinite": "ignore"}})
    with pytest.raises(ConfigError, match="trainer.spike.min_steps"):
        from_dict(TrainConfig, {"trainer": {"spike": {"window": 5, "min_steps": 6}}})


def test_on_nonfinite_stop_and_consecutive_skips():
    stop = StepGuard(TrainerConfig(on_nonfinite="stop"))
    with pytest.raises(TrainingHalted, match="rank\\(s\\) 1; trainer.on_nonfinite=stop"):
        stop.decide(4, float("nan"), [1])
    skip = StepGuard(TrainerConfig(max_consecutive_skips=1))
    assert skip.decide(1, 5.0, []) == "apply"
    assert skip.decide(2, math.inf, [0]) == "skip"
    assert skip.decide(3, 5.0, []) == "apply"  # a good step resets the count
    assert skip.decide(4, math.nan, [1]) == "skip"
    with pytest.raises(TrainingHalted, match="max_consecutive_skips=1"):
        skip.decide(5, math.nan, [1])
    assert skip.counters()["skipped_steps"] == 2 and skip.counters()["nonfinite_steps"] == 3


def test_gradients_spread_to_every_rank_do_not_blame_every_rank(caplog):
    """A NaN gradient of one rank reaches every rank through the reduction: with finite
    losses everywhere the warning says the rank is not known, rather than naming all."""
    from mm_moe.trainer.guard import SPREAD_GRADIENTS

    guard = StepGuard(TrainerConfig())
    with caplog.at_level("WARNING", logger="mm_moe"):
        assert guard.decide(3, 5.0, [0, 1, 2, 3], SPREAD_GRADIENTS) == "skip"
        assert guard.decide(4, 5.0, [2], "gradients") == "skip"
    spread, one = caplog.records[0].getMessage(), caplog.records[1].getMessage()
    assert "finite losses on all 4 ranks" in spread and "rank(s)" not in spread
    assert "non-finite gradients on rank(s) 2" in one


def test_spike_zscore_and_actions():
    losses = [5.0, 5.1, 4.9, 5.05, 4.95]
    detector = SpikeDetector(SpikeConfig(window=5, min_steps=5, zscore=6.0))
    for x in losses[:4]:
        detector.add(x)
    assert detector.zscore(50.0) is None  # fewer than min_steps losses
    detector.add(losses[4])
    assert detector.is_spike(5.2)[0] is False and detector.is_spike(6.0)[0] is True
    guard = StepGuard(TrainerConfig(spike=SpikeConfig(window=5, min_steps=5, action="skip")))
    for step, x in enumerate(losses, 1):
        assert guard.decide(step, x, []) == "apply"
    assert guard.decide(6, 9.0, []) == "skip"
    assert guard.spikes.state_dict() == losses  # the spike did not enter the window
    restored = StepGuard(guard.cfg)
    restored.load_state_dict(guard.state_dict())
    assert restored.counters() == guard.counters() and restored.spikes.state_dict() == losses


def test_fault_spec_parsing():
    nan, kill = parse("nan:rank=1:step=3-5,kill:step=4:once=/tmp/x")
    assert (nan.kind, nan.first, nan.last, nan.rank) == ("nan", 3, 5, 1)
    assert nan.hits(4, 1) and not nan.hits(4, 0) and not nan.hits(6, 1)
    assert kill.options == {"once": "/tmp/x"} and kill.hits(4, 0)
    with pytest.raises(ValueError, match="unknown fault"):
        parse("explode:step=1")
