"""Config schemas (dataclasses) and the one-time validation of composed YAML against them."""

from mm_moe.config.schema import TrainConfig
from mm_moe.config.validate import ConfigError, from_dict, to_dict

__all__ = ["ConfigError", "TrainConfig", "from_dict", "to_dict"]
