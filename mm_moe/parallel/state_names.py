"""The names of the engine's state as `full_state.local_state` hands it over and
`full_state.load_local_state` takes it back: one plain {name: tensor} dict.

    model/<parameter or buffer name>                the whole tensor
    optimizer/<parameter name>/<exp_avg|exp_avg_sq>   its whole Adam moment, fp32
    optimizer/step                                  the Adam step count (0-dim int64)

The optimizer entries are absent before the first optimizer step. A module of its own, free of
deepspeed, so that code reading checkpoints for inference can spell the names without loading
the engine's glue.
"""

from __future__ import annotations

MODEL = "model/"
OPTIMIZER = "optimizer/"
STEP = "optimizer/step"
