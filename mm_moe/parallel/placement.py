"""Where each expert lives under expert parallelism.

Every EP rank holds an equal, contiguous share of EVERY modality group's experts, so no rank idles
when a batch is mostly one modality. With text 4 + image 4 experts at EP=2:

    rank 0: text 0-1, image 0-1      (global ids 0, 1, 4, 5)
    rank 1: text 2-3, image 2-3      (global ids 2, 3, 6, 7)

Global expert ids follow `MoEConfig.groups()` (text experts, then image experts; or one `mixed`
group). A rank's local experts are ordered by group, then by index inside the group. The dispatch
slot of an expert, `owner * experts_per_rank + local_index`, is the order rows are sorted in
before the all-to-all: rows for rank 0 first, each rank's rows grouped by its local experts.

Pure bookkeeping (no torch.distributed): unit-testable, and the identity at EP=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_moe.errors import UserError


@dataclass(frozen=True)
class ExpertPlacement:
    # (group name, experts in the group), in global id order.
    groups: tuple[tuple[str, int], ...]
    ep_size: int

    def __post_init__(self) -> None:
        for name, n in self.groups:
            if n % self.ep_size:
                raise UserError(
                    f"parallel.expert_parallel_size={self.ep_size} must divide the {n} experts "
                    f"of group '{name}' (moe.experts_per_modality x moe.granularity)"
                )

    @property
    def num_experts(self) -> int:
        return sum(n for _, n in self.groups)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    def owner(self, global_id: int) -> tuple[int, int]:
        """(EP rank, local index) of a global expert id."""
        base, local_base = 0, 0
        for _, n in self.groups:
            share = n // self.ep_size
            if global_id < base + n:
                i = global_id - base
                return i // share, local_base + i % share
            base += n
            local_base += share
        raise IndexError(f"expert {global_id} out of range ({self.num_experts} experts)")

    def local_experts(self, ep_rank: int) -> list[int]:
        """Global ids held by `ep_rank`, in local order."""
        ids, base = [], 0
        for _, n in self.groups:
            share = n // self.ep_size
            ids += range(base + ep_rank * share, base + (ep_rank + 1) * share)
            base += n
        return ids

    def slot_of_expert(self) -> torch.Tensor:
        """[E] dispatch slot of each global expert id (int64)."""
        slots = []
        for e in range(self.num_experts):
            rank, local = self.owner(e)
            slots.append(rank * self.experts_per_rank + local)
        return torch.tensor(slots, dtype=torch.long)

    def expert_names(self) -> list[tuple[str, int]]:
        """(group, index in group) of each global expert id."""
        return [(name, i) for name, n in self.groups for i in range(n)]
