"""`trainer.compile=true`: torch.compile applied from outside, one decoder block at a time
(torchtitan's per-block compile: one graph per block shape, reused by every block of that
shape, short compile times).

- Dense and MoT blocks compile whole, with `fullgraph=True`: a graph break (a host sync such as
  `.item()` or `nonzero`) is an error, not a silent slowdown.
- MoE blocks compile their attention (projections, QK-norm, RoPE, the kernel); the MoE layer
  stays eager: its work depends on the routing (tokens per expert are data, read on the host
  to split the GEMMs and the all-to-all), which dynamo would break on or recompile for.
- Mixture-of-depths blocks (a data-dependent token selection) compile the inner block's
  attention the same way.

`Module.compile()` compiles in place, so parameter names (and checkpoints) do not change.
"""

from __future__ import annotations

import logging

from torch import nn

from mm_moe.model.block import TransformerBlock
from mm_moe.model.mod import MoDBlock
from mm_moe.model.moe.layer import MoELayer

log = logging.getLogger("mm_moe")


def compile_blocks(model: nn.Module) -> dict[str, int]:
    """Compile every decoder block of `model` in place; returns what was compiled."""
    counts = {"whole_blocks": 0, "attention_only": 0}
    for layer in model.layers:
        block = layer.block if isinstance(layer, MoDBlock) else layer
        assert isinstance(block, TransformerBlock)
        if isinstance(layer, MoDBlock) or isinstance(block.ffn, MoELayer):
            block.attn.compile(fullgraph=True)
            counts["attention_only"] += 1
        else:
            block.compile(fullgraph=True)
            counts["whole_blocks"] += 1
    log.info(
        "trainer.compile: %d blocks compiled whole, %d with their attention only (MoE and "
        "mixture-of-depths routing stays eager: its shapes depend on the data)",
        counts["whole_blocks"],
        counts["attention_only"],
    )
    return counts
