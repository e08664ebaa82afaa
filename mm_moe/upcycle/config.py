"""Options of `python -m mm_moe.upcycle` that are not part of the training config.

The target model itself is described with the training config's own keys (`model.*`,
`moe.*`, `tokenizer.*`, `data.*`, group choices such as `moe=moma_4t4i_tc`), validated against
the same schemas training uses; this dataclass holds only what says how to get there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mm_moe.errors import UserError

UNTIE = Literal["ffn", "attention", "norms"]


@dataclass
class UpcycleConfig:
    # The dense checkpoint: this project's (a step directory, a checkpoint directory with
    # `latest`, or a run directory) or a Hugging Face Llama-family folder (config.json and
    # model.safetensors, or sharded model-0000x-of-0000y.safetensors with their index).
    source: str = ""
    source_format: Literal["native", "hf"] = "native"
    # The checkpoint to write (a directory); refused when it is not empty unless overwrite.
    out: str = ""
    overwrite: bool = False
    # MoT: per-modality copies of these parts (the same as model.untie; either may be given).
    untie: list[UNTIE] | None = None
    # Drop-Upcycling (Nakamura et al. 2025): the fraction of each expert's hidden units
    # re-initialized from the source matrices' statistics, a different subset per expert.
    drop_ratio: float = 0.0
    # Router weights ~ N(0, router_init_std^2); 0 gives a zero router (uniform scores).
    router_init_std: float = 0.02
    # Gaussian noise on every expert copy, times each source matrix's std (breaks the copies'
    # symmetry; not function-preserving); 0 is off.
    expert_noise: float = 0.0
    # New embedding / output rows (image codes, special tokens): the mean of the source rows
    # plus Gaussian noise of this times the rows' per-dimension std.
    new_rows_noise: float = 0.1
    # Seeds the target's fresh parameters, the router, Drop-Upcycling subsets and noise.
    seed: int = 0
    # Compare source and result logits on text-only input and print the largest difference.
    verify: bool = False
    verify_batch_size: int = 2
    verify_seq_len: int = 64

    def __post_init__(self) -> None:
        if not self.source:
            raise UserError("source=PATH is required: the dense checkpoint to upcycle")
        if not self.out:
            raise UserError("out=PATH is required: the directory to write the checkpoint to")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise UserError(f"drop_ratio={self.drop_ratio} must be in [0, 1)")
        for name in ("router_init_std", "expert_noise", "new_rows_noise"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:  # NaN passes a "< 0" test
                raise UserError(f"{name}={value} must be a finite number >= 0")
        if self.verify_batch_size < 1 or self.verify_seq_len < 1:
            raise UserError("verify_batch_size and verify_seq_len must be >= 1")
