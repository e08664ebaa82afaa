"""Count the ops that make the host wait for the GPU ("host syncs"), on any device.

On CUDA an op whose output shape or value the host must read (a `.item()`, `nonzero`, a
boolean-mask index, `bincount`: its CUDA kernel reads the input's max) blocks the CPU until the
GPU has drained its queue, and so does a copy to or from pageable host memory. Each one in a
training step leaves the GPU idle while Python prepares the next kernels. On a CPU these ops
cost nothing special, so the counter recognises them by name, which lets CPU tests hold the GPU
budget ("count, don't assert").

    with HostSyncCounter() as syncs:
        loss = model(...).logits.sum(); loss.backward()
    syncs.total, syncs.by_op  # e.g. 1, {'nonzero': 1}
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Always a sync on CUDA (CUDA's bincount reads the input's max even with minlength).
_ALWAYS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    # A tensor made from Python data (torch.tensor, new_tensor, as_tensor of a list): on
    # CUDA a copy from pageable host memory.
    aten.lift_fresh.default: "host_data",
}


def _bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


def _crosses_host(func, args, kwargs) -> bool:
    """A copy between host and an accelerator (not pinned + non_blocking)."""
    if func not in (aten._to_copy.default, aten.copy_.default):
        return False
    src = args[1] if func is aten.copy_.default else args[0]
    dst = kwargs.get("device") if func is aten._to_copy.default else args[0].device
    if dst is None or not isinstance(src, torch.Tensor):
        return False
    if (src.device.type == "cpu") == (torch.device(dst).type == "cpu"):
        return False
    return not (kwargs.get("non_blocking") and src.device.type == "cpu" and src.is_pinned())


def sync_kind(func, args, kwargs) -> str | None:
    """The name of the host sync `func(*args, **kwargs)` makes on CUDA, None if none."""
    if func in _ALWAYS:
        return _ALWAYS[func]
    indexing = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)
    if func in indexing and _bool_index(args[1]):
        return "bool_index"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave"
    if _crosses_host(func, args, kwargs):
        return "device_copy"
    return None


class HostSyncCounter(TorchDispatchMode):
    """Counts host syncs (see `sync_kind`) and `Tensor.tolist`/`numpy`/`cpu` calls (which copy
    to the host without going through an op that the dispatcher sees on a CPU)."""

    _PATCHED = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._originals: dict = {}
        self._inside_host_call = False

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = sync_kind(func, args, kwargs)
        if kind is not None and not self._inside_host_call:
            self.by_op[kind] += 1
        return func(*args, **kwargs)

    def _patch(self, name: str):
        original = getattr(torch.Tensor, name)

        def counted(tensor, *args, **kwargs):
            if self._inside_host_call:
                return original(tensor, *args, **kwargs)
            self.by_op[name] += 1
            self._inside_host_call = True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._inside_host_call = False

        self._originals[name] = original
        setattr(torch.Tensor, name, counted)

    def __enter__(self):
        for name in self._PATCHED:
            self._patch(name)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals.clear()
        return super().__exit__(*exc)
