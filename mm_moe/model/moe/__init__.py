"""Modality-aware Mixture-of-Experts: router, experts, dispatch, layer, losses.

Single-device code. Expert parallelism replaces the layer's `dispatcher` from outside
(mm_moe.parallel); nothing here knows about process groups.
"""

from mm_moe.model.moe.config import MoEConfig

__all__ = ["MoEConfig"]
