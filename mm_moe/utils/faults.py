"""Fault injection for tests only: the grammar of `MM_MOE_FAULT_INJECT` and what each fault
does; mm_moe/trainer/fault_injection.py wraps a built run with it from outside.

    MM_MOE_FAULT_INJECT="nan:rank=1:step=3"                 NaN loss on rank 1 at step 3
    MM_MOE_FAULT_INJECT="nan:step=3-5"                      ... on every rank, steps 3 to 5
    MM_MOE_FAULT_INJECT="spike:step=12:scale=30"            logits x30 at step 12 (a loss spike)
    MM_MOE_FAULT_INJECT="kill:rank=1:step=4:once=PATH"      SIGKILL rank 1 at step 4; with
                                                            `once`, only if PATH does not exist
                                                            (it is created), so a restart runs
    MM_MOE_FAULT_INJECT="hang:rank=1:step=4"                SIGSTOP rank 1 at step 4 (a hang)
    MM_MOE_FAULT_INJECT="write_error:step=6"                ENOSPC while saving step 6
    MM_MOE_FAULT_INJECT="drop_batch:step=3:count=2"         discard 2 batches before step 3
                                                            (reference runs for skip/rollback)

Faults are separated by commas. Without the variable nothing here does anything.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from mm_moe.errors import UserError

ENV = "MM_MOE_FAULT_INJECT"
KINDS = ("nan", "spike", "kill", "hang", "write_error", "drop_batch")


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    rank: int | None = None
    options: dict = field(default_factory=dict)

    def hits(self, step: int, rank: int | None = None) -> bool:
        in_range = self.first <= step <= self.last
        return in_range and (self.rank is None or rank is None or self.rank == rank)


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, *fields = item.split(":")
        if kind not in KINDS:
            raise UserError(f"{ENV}: unknown fault {kind!r} in {item!r}; one of {KINDS}")
        opts = dict(f.split("=", 1) for f in fields)
        if "step" not in opts:
            raise UserError(f"{ENV}: {item!r} needs step=N (or step=A-B)")
        first, _, last = opts.pop("step").partition("-")
        rank = opts.pop("rank", None)
        faults.append(
            Fault(kind, int(first), int(last or first), None if rank is None else int(rank), opts)
        )
    return faults


class FaultInjector:
    def __init__(self, faults: list[Fault]):
        self.faults = faults

    @classmethod
    def from_env(cls) -> FaultInjector:
        return cls(parse(os.environ.get(ENV, "")))

    def _find(self, kind: str, step: int, rank: int | None = None) -> Fault | None:
        return next((f for f in self.faults if f.kind == kind and f.hits(step, rank)), None)

    def loss_factor(self, step: int, rank: int) -> float:
        """Multiplies the logits of the step's first micro-batch (NaN: a non-finite loss)."""
        if self._find("nan", step, rank):
            return float("nan")
        spike = self._find("spike", step, rank)
        return float(spike.options.get("scale", 100.0)) if spike else 1.0

    def maybe_kill(self, step: int, rank: int) -> None:
        fault = self._find("kill", step, rank)
        if fault is None:
            return
        once = fault.options.get("once")
        if once:
            marker = Path(once)
            if marker.exists():
                return
            marker.write_text(f"killed rank {rank} at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    def maybe_hang(self, step: int, rank: int) -> None:
        if self._find("hang", step, rank):
            os.kill(os.getpid(), signal.SIGSTOP)

    def batches_to_drop(self, step: int) -> int:
        fault = self._find("drop_batch", step)
        return int(fault.options.get("count", 1)) if fault and step == fault.first else 0

    def write_fails(self, step: int) -> bool:
        return self._find("write_error", step) is not None
