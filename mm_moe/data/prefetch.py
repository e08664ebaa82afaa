"""The next step's batches, prepared while the current step runs.

    loader = Prefetcher(loader, pin_memory=torch.cuda.is_available())

A background thread calls the loader's `next()` ahead of the training loop (packing,
tokenizing and `Batch.from_tokens` are host work the GPU would otherwise wait for): with
`depth` 1 one step waits in the queue while the thread builds the one after, so two global
batches exist beyond the current one. It pins the batches' tensors on CUDA machines, so that
`Batch.to(device)` (non_blocking=True) copies them asynchronously. Exact resume is kept:
`state_dict()` and `counters()` are the loader's as of the batches the trainer has taken,
never of the ones fetched ahead, and `load_state_dict` drops what was fetched ahead.

A loader whose `next()` were collective must not run beside the step's own collectives, whose
order every rank must agree on: loaders say `prefetch_safe` where `next()` is local; those that
do not are read on the calling thread, still pinned. A loader whose `state_dict()` is collective
(the webdataset loader gathers its streams' states to rank 0 when a checkpoint is staged) has a
local `local_state()`: the thread snapshots that, and `state_dict()` hands the snapshot of the
batches taken to the loader's `state_dict(local=...)` on the calling thread.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from dataclasses import fields

import torch

from mm_moe.data.batch import Batch
from mm_moe.data.defects import worker_stopped

log = logging.getLogger(__name__)
# How long close() waits for a loader call in flight (a stalled `pipe:` source) to return.
JOIN_TIMEOUT_S = 30.0
# How often a wait for the next batches looks whether the loader's workers are alive.
WATCH_S = 5.0


def pin(batches: list[Batch]) -> list[Batch]:
    """The batches with their tensors in page-locked memory (asynchronous host-to-device)."""
    out = []
    for b in batches:
        values = {f.name: getattr(b, f.name) for f in fields(b)}
        pinned = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in values.items()}
        out.append(Batch(**pinned))
    return out


class Prefetcher:
    def __init__(self, loader, pin_memory: bool = False, depth: int = 1, device=None):
        self.loader, self.pin_memory, self.depth = loader, pin_memory, depth
        # The thread's CUDA device: pinning on a new thread otherwise makes a context on GPU 0
        # in every rank of the node.
        self.device = torch.device(device) if device is not None else None
        self.threaded = bool(getattr(loader, "prefetch_safe", False))
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # (state, counters) as of the batches taken so far (threaded only)
        self._taken = self._snapshot() if self.threaded else ({}, {})

    def _snapshot(self) -> tuple[dict, dict]:
        counters = self.loader.counters() if hasattr(self.loader, "counters") else {}
        if hasattr(self.loader, "local_state"):
            return self.loader.local_state(), dict(counters)
        return copy.deepcopy(self.loader.state_dict()), dict(counters)

    def _produce(self):
        batches = self.loader.next()
        if self.pin_memory:
            batches = pin(batches)
        return batches, self._snapshot()

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        # As torch's own pin-memory thread: one intra-op thread (the step keeps the rest), and
        # the rank's own device.
        torch.set_num_threads(1)
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
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
        item = self._wait()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        batches, self._taken = item
        return batches

    def _wait(self):
        """The thread's next item. A data worker killed mid-message (the OOM killer) can leave
        the loader's read blocked for good, where torch's own dead-worker check never runs:
        the workers' liveness is looked at while waiting, and a dead one ends the wait."""
        while True:
            try:
                return self._queue.get(timeout=WATCH_S)
            except queue.Empty:
                dead = self.loader.dead_workers() if hasattr(self.loader, "dead_workers") else []
                if dead:
                    self._stop.set()  # the thread is stuck in the loader: left behind
                    self._thread = self._queue = None
                    pids = ", ".join(map(str, dead))
                    return worker_stopped(f"pid(s) {pids} died, the loader waiting on it")

    def _halt(self) -> None:
        """Stop the thread and drop what it fetched ahead (the loader is then at or past the
        taken position; load_state_dict puts it back)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT_S)
        if self._thread.is_alive():  # a daemon thread: it cannot keep the process alive
            log.warning(
                "the data prefetch thread did not stop within %.0f s (a loader call in flight, "
                "e.g. a stalled pipe: source); leaving it behind",
                JOIN_TIMEOUT_S,
            )
        self._thread = self._queue = None

    def state_dict(self) -> dict:
        if not self.threaded:
            return self.loader.state_dict()
        if hasattr(self.loader, "local_state"):
            return self.loader.state_dict(local=self._taken[0])
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
