"""Keys and values of the positions a decoder has already seen, for incremental decoding.

Sampling appends one token per row at a time: with the cache, each forward runs only the new
positions, their queries attending to the cached keys. Every layer of the decoder is
position-wise except attention (the MoE layers route each token alone in eval mode: token
choice, or expert choice through its causal auxiliary routers), so the new positions' outputs
equal a forward over the whole prefix. Mixture-of-depths is the exception: a layer's keys
exist only for the tokens its router took, a different set per row, so models with MoD layers
decode without a cache (`supports_kv_cache`).

Shape legend: B batch, K key/value heads, S sequence, D head dim.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0  # positions cached (every layer's the same after a forward)

    def append(
        self, layer: int, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this forward's keys and values of `layer`; all of the layer's, cached first."""
        if layer in self.keys:
            k_BKSD = torch.cat([self.keys[layer], k_BKSD], 2)
            v_BKSD = torch.cat([self.values[layer], v_BKSD], 2)
        self.keys[layer], self.values[layer] = k_BKSD, v_BKSD
        return k_BKSD, v_BKSD

    def repeat_rows(self, n: int) -> None:
        """Row b becomes rows b * n .. b * n + n - 1: n continuations of each cached prefix."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer].repeat_interleave(n, 0)
            self.values[layer] = self.values[layer].repeat_interleave(n, 0)


def supports_kv_cache(model) -> bool:
    # A module says it cannot be replayed from cached keys (MoDBlock) rather than this file
    # importing it: the forward context imports this file, and MoDBlock imports the context.
    return not any(getattr(m, "breaks_kv_cache", False) for m in model.modules())
