"""The step loader of the webdataset source: logical streams dealt out to ranks and workers.

Step s's global batch of G rows is stream-major: with N = data.num_streams streams and
k = G / N rows per stream, rows [j*k, (j+1)*k) are stream j's rows of that step. Rank r of W
takes rows [r*G/W, (r+1)*G/W) and runs only the streams those rows come from (a stream that
straddles two ranks is run by both: same result, twice the work, so choose N as a multiple of
W). Dataloader workers split a rank's streams. None of this changes what the rows are, so the
global batch depends only on sources, seed and s.

The loader's state is every stream's state (stream.py). Only rank 0's state_dict() reaches the
checkpoint, so state_dict() is collective with several ranks: every rank calls it (the
checkpoint's staging does) and sends rank 0 the states of the streams it owns (a small
gather_object); on load, every rank gets every stream's state and picks its own. `next()`
itself is local, so data/prefetch.py may run it on its thread beside the step's collectives;
it keeps `local_state()` snapshots and hands the one of the batches taken to state_dict().
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tarfile

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader

from mm_moe.data.batch import Batch
from mm_moe.data.defects import REASONS, DataError, counter_key, worker_stopped
from mm_moe.data.loader import WEIGHTS_ONLY, changed_keys
from mm_moe.data.shards import is_remote
from mm_moe.data.stream import PipelineSpec
from mm_moe.data.stream_dataset import StreamsDataset, identity
from mm_moe.errors import UserError
from mm_moe.tokenization.vocab import Vocab

log = logging.getLogger(__name__)
STATE_KIND = "webdataset"
STATE_VERSION = 1


def _names(shards: tuple[str, ...], paths: bool) -> list[str]:
    """The shards as a saved position knows them: local ones by file name (shards moved or
    copied elsewhere, to a node's local disk, are the same shards: `contents` compares what
    they hold), remote urls whole (their contents are not read); with `paths`, every url
    whole (how checkpoints before this named them)."""
    return [u if paths or is_remote(u) else os.path.basename(u) for u in shards]


def fingerprint(spec: PipelineSpec, paths: bool = False) -> str:
    """What a saved stream position is only valid for: sources, seed, number of streams."""
    what = [
        spec.seed,
        spec.num_streams,
        [[_names(s.shards, paths), s.format, s.weight] for s in spec.sources],
    ]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def described(spec: PipelineSpec, paths: bool = False) -> dict[str, object]:
    """What `fingerprint` covers, key by key, so that a refused resume can name what changed
    (a source's shards by count and digest of their names: meta.json stays small)."""
    out: dict[str, object] = {"trainer.seed": spec.seed, "data.num_streams": spec.num_streams}
    for i, s in enumerate(spec.sources):
        shards = hashlib.sha256(json.dumps(_names(s.shards, paths)).encode()).hexdigest()[:12]
        out[f"data.sources[{i}].format"] = s.format
        out[f"data.sources[{i}].weight"] = s.weight
        out[f"data.sources[{i}].urls"] = f"{len(s.shards)} shards, sha256 {shards}"
    return out


# Bytes of each local shard's first member read for `contents`.
CONTENT_PROBE_BYTES = 1024


def _first_member(url: str) -> bytes:
    """A local shard's size, its first member's name and size, and the start of its data:
    not the headers' times (a rebuild of the same samples writes other ones)."""
    with tarfile.open(url, "r|*") as tar:
        member = tar.next()
        if member is None:
            return f"{os.path.getsize(url)}:empty".encode()
        head = tar.extractfile(member).read(CONTENT_PROBE_BYTES) if member.isfile() else b""
    return f"{os.path.getsize(url)}:{member.name}:{member.size}:".encode() + head


def contents(spec: PipelineSpec) -> dict[str, str | None]:
    """Per source, a digest of its local shards' sizes and first bytes: shards rebuilt in
    place (the same names, other samples) no longer match a saved position; copies do. Remote
    shards are not read for it; a source with a shard that cannot be read has None (not
    compared)."""
    out: dict[str, str | None] = {}
    for i, s in enumerate(spec.sources):
        h = hashlib.sha256()
        try:
            for url in s.shards:
                if not is_remote(url):
                    h.update(_first_member(url))
            out[f"data.sources[{i}]"] = h.hexdigest()[:16]
        except (OSError, tarfile.TarError):
            out[f"data.sources[{i}]"] = None
    return out


class WebDatasetLoader:
    def __init__(
        self,
        spec: PipelineSpec,
        vocab: Vocab,
        num_workers: int,
        rank: int,
        dp_world_size: int,
        micro_batch_size: int,
        global_batch_size: int,
    ):
        num_streams = spec.num_streams
        if global_batch_size % num_streams:
            raise UserError(
                f"trainer.global_batch_size={global_batch_size} must be a multiple of "
                f"data.num_streams={num_streams} (each stream gives the same number of rows)"
            )
        assert global_batch_size % (dp_world_size * micro_batch_size) == 0
        self.spec, self.vocab, self.num_workers = spec, vocab, num_workers
        self.rank, self.dp_world_size = rank, dp_world_size
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.rows_per_stream = global_batch_size // num_streams
        per_rank = global_batch_size // dp_world_size
        self.rows = [
            (i // self.rows_per_stream, i % self.rows_per_stream)
            for i in range(rank * per_rank, (rank + 1) * per_rank)
        ]
        self.streams = sorted({j for j, _ in self.rows})
        owner = lambda j: j * self.rows_per_stream // per_rank  # rank holding its first row
        self.owned = [j for j in self.streams if owner(j) == rank]
        shared = [
            j
            for j in range(num_streams)
            if owner(j) != ((j + 1) * self.rows_per_stream - 1) // per_rank
        ]
        if shared and rank == 0:
            log.warning(
                "data.num_streams=%d over %d data-parallel ranks: %d stream(s) are run by several "
                "ranks (correct, but duplicated work); use a multiple of the rank count",
                num_streams,
                dp_world_size,
                len(shared),
            )
        self.fingerprint = fingerprint(spec)
        self._content_digests: dict[str, str | None] | None = None
        self.states: dict[int, dict | None] = dict.fromkeys(range(num_streams))
        self.step = 0
        self._iter = None
        self._items_per_step = 0

    # ---- producing steps ----
    def _start(self) -> None:
        dataset = StreamsDataset(
            self.spec,
            self.streams,
            {j: self.states[j] for j in self.streams},
            self.rows_per_stream,
            self.step,
        )
        workers = min(self.num_workers, len(self.streams))
        if workers == 0:
            self._iter, self._items_per_step = iter(dataset), 1
            return
        loader = DataLoader(
            dataset, batch_size=None, num_workers=workers, collate_fn=identity, prefetch_factor=2
        )
        self._iter, self._items_per_step = iter(loader), workers

    def dead_workers(self) -> list[int]:
        """The pids of this loader's dataloader workers that died (none without workers)."""
        workers = getattr(self._iter, "_workers", None) or []
        return [w.pid for w in workers if not w.is_alive()]

    def _step_rows(self) -> dict[int, tuple[dict, dict]]:
        if self._iter is None:
            self._start()
        rows = {}
        for _ in range(self._items_per_step):
            try:
                step, payload = next(self._iter)
            except RuntimeError as exc:
                if "exited unexpectedly" not in str(exc):
                    raise
                self.close()  # killed (the OOM killer): its streams' positions are gone
                raise worker_stopped(str(exc)) from None
            if step == "error":
                self.close()
                raise DataError(payload)
            assert step == self.step, (step, self.step)
            rows.update(payload)
        assert sorted(rows) == self.streams
        return rows

    def next(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step."""
        rows = self._step_rows()
        for j, (_, state) in rows.items():
            self.states[j] = state
        take = lambda name: np.stack([rows[j][0][name][r] for j, r in self.rows])
        tokens, modality, doc, position = (
            take(n) for n in ("tokens", "modality", "doc", "position")
        )
        batches = []
        for start in range(0, len(self.rows), self.micro_batch_size):
            part = slice(start, start + self.micro_batch_size)
            batches.append(
                Batch.from_tokens(
                    tokens[part].astype(np.int64),
                    modality[part],
                    doc[part],
                    position[part],
                    tokens[part] != self.vocab.pad,
                )
            )
        self.step += 1
        return batches

    # next() is local (no collective), so data/prefetch.py may call it on its thread.
    prefetch_safe = True

    def local_state(self) -> dict:
        """This rank's position, not collective: the step and its own streams' states."""
        return {
            "step": self.step,
            "streams": copy.deepcopy({j: self.states[j] for j in self.owned}),
        }

    def _gather_to_rank0(self, local: dict) -> dict[int, dict | None]:
        """Every stream's state on rank 0 (collective with several ranks)."""
        states = {**self.states, **local["streams"]}
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return states
        everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local["streams"], everyone, dst=0)
        for theirs in everyone or []:
            states.update(theirs)
        return states

    def close(self) -> None:
        self._iter = None  # a DataLoader iterator shuts its workers down when released

    # ---- state and counters ----
    def counters(self) -> dict[str, int]:
        """Skips and documents of the streams this rank owns (the loop sums over ranks)."""
        totals = {counter_key(r): 0 for r in REASONS}
        totals["data/documents"] = 0
        for j in self.owned:
            state = self.states[j]
            if state is not None:
                for reason in REASONS:
                    totals[counter_key(reason)] += state["skipped"][reason]
                totals["data/documents"] += state["documents"]
        return totals

    def state_dict(self, local: dict | None = None) -> dict:
        """Collective with several ranks: every rank calls it, rank 0's holds every stream.
        `local`: a `local_state()` taken earlier (the batches taken, not those fetched ahead)."""
        local = self.local_state() if local is None else local
        states = self._gather_to_rank0(local)
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "step": local["step"],
            "num_streams": self.spec.num_streams,
            "fingerprint": self.fingerprint,
            "described": described(self.spec),
            "contents": self._contents(),
            "streams": {str(j): states[j] for j in range(self.spec.num_streams)},
        }

    def _contents(self) -> dict[str, str | None]:
        """`contents` of the run's shards, read once (the shards do not change under a run)."""
        if self._content_digests is None:
            self._content_digests = contents(self.spec)
        return self._content_digests

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != STATE_KIND:
            raise UserError(
                "the checkpoint's data position is not from the webdataset source "
                f"(it holds {sorted(state)}); resume with the data.source it was trained on, "
                f"or take its weights alone: {WEIGHTS_ONLY}"
            )
        if state["version"] != STATE_VERSION:
            raise UserError(f"data state version {state['version']} is not {STATE_VERSION}")
        # Checkpoints from before shards were named by file name carry the paths' fingerprint.
        known = (self.fingerprint, fingerprint(self.spec, paths=True))
        if state["num_streams"] != self.spec.num_streams or state["fingerprint"] not in known:
            saved = state.get("described")  # checkpoints from before it: no detail
            # against the naming of the save (its shards' paths, before file names)
            differ = lambda d: sum(saved.get(k) != d.get(k) for k in {**saved, **d})  # noqa: E731
            now = min((described(self.spec, paths) for paths in (False, True)), key=differ)
            what = f" ({changed_keys(saved, now)})" if saved else ""
            raise UserError(
                "the checkpoint's data position was saved for other data.sources, "
                f"data.num_streams (it had {state['num_streams']}) or trainer.seed{what}; resuming "
                f"exactly needs the same ones. To train its weights on other data: {WEIGHTS_ONLY}"
            )
        saved = state.get("contents", {})  # checkpoints from before it: not compared
        changed = [k for k, v in self._contents().items() if v and saved.get(k) not in (None, v)]
        if changed:
            raise UserError(
                f"the shards of {', '.join(changed)} changed since the checkpoint (the same "
                "names, other sizes or samples: rebuilt in place?), so its data position points "
                "into other data. Resume with the shards it was saved with, or train its "
                f"weights on these: {WEIGHTS_ONLY}"
            )
        self.states = {j: state["streams"][str(j)] for j in range(self.spec.num_streams)}
        self.step = int(state["step"])
        self.close()
