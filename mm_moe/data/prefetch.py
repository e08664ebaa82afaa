"""The next step's batches, prepared while the current step runs.

    loader = Prefetcher(loader, pin_memory=torch.cuda.is_available())

A background thread calls the loader's `next()` one step ahead (packing, tokenizing and
`Batch.from_tokens` are host work the GPU would otherwise wait for), and pins the batches'
tensors on CUDA machines, so that `Batch.to(device)` (non_blocking=True) copies them
asynchronously. Exact resume is kept: `state_dict()` and `counters()` are the loader's as of
the batches the trainer has taken, never of the ones fetched ahead, and `load_state_dict`
drops what was fetched ahead.

A loader whose `next()` is collective (the webdataset loader gathers stream states to rank 0
at every step when it has several ranks) must not run beside the step's own collectives, whose
order every rank must agree on: loaders say so with `prefetch_safe`; those that do not (or say
false) are read on the calling thread, still pinned.
"""

from __future__ import annotations

import copy
import queue
import threading
from dataclasses import fields

import torch

from mm_moe.data.batch import Batch

_STOP = object()


def pin(batches: list[Batch]) -> list[Batch]:
    """The batches with their tensors in page-locked memory (asynchronous host-to-device)."""
    out = []
    for b in batches:
        values = {f.name: getattr(b, f.name) for f in fields(b)}
        pinned = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in values.items()}
        out.append(Batch(**pinned))
    return out


class Prefetcher:
    def __init__(self, loader, pin_memory: bool = False, depth: int = 1):
        self.loader, self.pin_memory, self.depth = loader, pin_memory, depth
        self.threaded = bool(getattr(loader, "prefetch_safe", False))
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # (state, counters) as of the batches taken so far (threaded only)
        self._taken = self._snapshot() if self.threaded else ({}, {})

    def _snapshot(self) -> tuple[dict, dict]:
        counters = self.loader.counters() if hasattr(self.loader, "counters") else {}
        return copy.deepcopy(self.loader.state_dict()), dict(counters)

    def _produce(self):
        batches = self.loader.next()
        if self.pin_memory:
            batches = pin(batches)
        return batches, self._snapshot()

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = self._produce()
            except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
                item = e
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._run, args=(self._queue, self._stop), name="mm_moe-prefetch", daemon=True
        )
        self._thread.start()

    def next(self) -> list:
        """The next step's batches (the loader's `next()`)."""
        if not self.threaded:
            batches = self.loader.next()
            return pin(batches) if self.pin_memory else batches
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        batches, self._taken = item
        return batches

    def _halt(self) -> None:
        """Stop the thread and drop what it fetched ahead (the loader is then at or past the
        taken position; load_state_dict puts it back)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = self._queue = None

    def state_dict(self) -> dict:
        if not self.threaded:
            return self.loader.state_dict()
        return copy.deepcopy(self._taken[0])

    def counters(self) -> dict:
        if not self.threaded:
            return self.loader.counters() if hasattr(self.loader, "counters") else {}
        return dict(self._taken[1])

    def load_state_dict(self, state: dict) -> None:
        self._halt()
        self.loader.load_state_dict(state)
        if self.threaded:
            self._taken = self._snapshot()

    def close(self) -> None:
        self._halt()
        if hasattr(self.loader, "close"):
            self.loader.close()

    def __getattr__(self, name):
        if name == "loader":  # before __init__ set it (copy, pickle)
            raise AttributeError(name)
        return getattr(self.loader, name)
