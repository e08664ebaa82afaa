"""A logical stream: its shards of every source, mixed by weight, tokenized and packed.

A stream is the unit of determinism. Its rows depend only on (sources, seed, stream id) and
its position, which `state_dict()` captures exactly: per source the epoch, the position in that
epoch's unit order and the raw-sample offset inside the current shard; the packing buffer; the
RNG that mixes sources and orders pairs; and the skip counters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mm_moe.data.defects import REASONS, SPLIT_KEY, DataError, SampleError
from mm_moe.data.documents import DecodeOptions, Document, DocumentBuilder
from mm_moe.data.packing import Packer
from mm_moe.data.shards import Unit, assign_units, epoch_order, source_units
from mm_moe.data.tar_reader import iter_raw_samples
from mm_moe.tokenization.config import TokenizerConfig

_RNG_TAG = 0x57EA
log = logging.getLogger(__name__)

# The keys that set the limit behind a reason (a corpus of small images needs a lower one).
REASON_KEYS = {"small_image": "data.min_image_side", "aspect_ratio": "data.max_aspect_ratio"}

# (source index, reason) of the skips this process has named in a warning.
_NAMED_SKIPS: set[tuple[int, str]] = set()
# Sources this process has warned about a mostly skipped shard, and the fewest skips in one
# slice of a shard that can be called "most".
_MOSTLY_SKIPPED: set[int] = set()
MOSTLY_SKIPPED_MIN = 4


@dataclass(frozen=True)
class SourceSpec:
    index: int
    shards: tuple[str, ...]
    format: str
    weight: float
    # The config key messages name it by: data.sources[i], or eval.sources[i] (held-out).
    key: str = ""

    @property
    def name(self) -> str:
        return self.key or f"data.sources[{self.index}]"


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a stream needs, picklable so that dataloader workers can rebuild it."""

    sources: tuple[SourceSpec, ...]
    num_streams: int
    seed: int
    row_len: int  # seq_len + 1
    on_error: str  # skip | raise
    decode: DecodeOptions
    tokenizer: TokenizerConfig
    whole_documents: bool = False  # data.whole_documents (mm_moe.data.packing)
    pad_id: int = 0


class SourceReader:
    """One source as seen by one stream: its units, walked epoch after epoch.

    A stream whose own units yield no usable sample in a whole epoch (its slices of a small
    source hold only bad samples, or the source has fewer samples than data.num_streams)
    borrows: from then on it walks every unit of the source, in its own seeded order. That
    depends only on (sources, seed, stream), so the global batch of a step and resuming stay
    exact at any world size. Only a source with no usable sample at all stops the run."""

    def __init__(
        self,
        source: SourceSpec,
        units: list[Unit],
        all_units: list[Unit],
        stream: int,
        spec: PipelineSpec,
    ):
        self.source, self.own_units, self.all_units = source, units, all_units
        self.stream, self.spec = stream, spec
        self.epoch, self.position, self.offset, self.epoch_documents = 0, 0, 0, 0
        self.borrowing = not units  # more streams than units: nothing of its own to read
        self._order = self._epoch_order()
        self._samples = None
        # This unit's skips by reason and its documents: a unit mostly skipped is warned about.
        self._unit_skips: dict[str, int] = {}
        self._unit_documents = 0

    @property
    def units(self) -> list[Unit]:
        return self.all_units if self.borrowing else self.own_units

    def _epoch_order(self) -> list[int]:
        return epoch_order(
            len(self.units), self.spec.seed, self.source.index, self.stream, self.epoch
        )

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "offset": self.offset,
            "epoch_documents": self.epoch_documents,
            "borrowing": self.borrowing,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.offset, self.epoch_documents = int(state["offset"]), int(state["epoch_documents"])
        self.borrowing = bool(state.get("borrowing", not self.own_units))
        assert 0 <= self.position < len(self.units)
        self._order = self._epoch_order()
        self._samples = None

    def _unit(self) -> Unit:
        return self.units[self._order[self.position]]

    def _url(self) -> str:
        return self.source.shards[self._unit().shard]

    def _next_unit(self, counters: dict[str, int]) -> None:
        self._warn_if_mostly_skipped()
        self._samples = None
        self._unit_skips, self._unit_documents = {}, 0
        self.position, self.offset = self.position + 1, 0
        if self.position < len(self.units):
            return
        if self.epoch_documents == 0 and self.borrowing:
            shards = list(self.source.shards)
            skipped = ", ".join(f"{n} {reason}" for reason, n in counters.items() if n)
            keys = [
                f"{key} ({reason})"
                for reason, key in REASON_KEYS.items()
                if counters.get(reason) and self.spec.on_error == "skip"
            ]
            hint = (f"; the limits are {', '.join(keys)}" if keys else "") + (
                "; data.on_error=raise names the first bad sample"
                if skipped
                else ": its shards hold no samples"
            )
            raise DataError(
                f"{self.source.name} ({self.source.format}): a whole epoch of "
                f"its shards {shards[:3]}{' ...' if len(shards) > 3 else ''} without one "
                f"usable sample (this stream skipped: {skipped or 'nothing'}){hint}"
            )
        if self.epoch_documents == 0:
            log.warning(
                "%s: stream %d found no usable sample in its %d slice(s) of the "
                "shards; it reads from the whole source from now on",
                self.source.name,
                self.stream,
                len(self.own_units),
            )
            self.borrowing = True
        self.epoch, self.position, self.epoch_documents = self.epoch + 1, 0, 0
        self._order = self._epoch_order()

    def _warn_if_mostly_skipped(self) -> None:
        """Once per source in this process: a slice of a shard where most samples were
        skipped (at least MOSTLY_SKIPPED_MIN), naming the shard and the main reason."""
        skipped = sum(self._unit_skips.values())
        if skipped < MOSTLY_SKIPPED_MIN or skipped <= self._unit_documents:
            return
        if self.source.name in _MOSTLY_SKIPPED:
            return
        _MOSTLY_SKIPPED.add(self.source.name)
        reason = max(self._unit_skips, key=self._unit_skips.get)
        log.warning(
            "%s (%s): shard %s: %d of its %d samples read here were skipped "
            "(%d %s): check the shard (the first skip of each kind is named above)",
            self.source.name,
            self.source.format,
            self._url(),
            skipped,
            skipped + self._unit_documents,
            self._unit_skips[reason],
            reason,
        )

    def _defect(self, error: SampleError, counters: dict[str, int]) -> None:
        counters[error.reason] += 1
        self._unit_skips[error.reason] = self._unit_skips.get(error.reason, 0) + 1
        where = "the shard itself" if error.key is None else f"key {error.key!r}"
        if self.spec.on_error == "raise":
            raise DataError(
                f"data.on_error=raise: {error.reason} in shard {self._url()}, {where} "
                f"({self.source.name}, format {self.source.format}): {error.detail}"
            )
        # The first skip of each reason per source in this process is named (the counters
        # data/skipped_<reason> count the rest), so a user sees what is wrong without a rerun.
        first = (self.source.name, error.reason)
        if first not in _NAMED_SKIPS:
            _NAMED_SKIPS.add(first)
            log.warning(
                "%s (%s): skipped %s in shard %s, %s: %s. Further skips of this "
                "kind are counted in data/skipped_%s; data.on_error=raise stops at the first",
                self.source.name,
                self.source.format,
                error.reason,
                self._url(),
                where,
                error.detail,
                error.reason,
            )

    def next_document(
        self, builder: DocumentBuilder, rng: np.random.Generator, counters: dict[str, int]
    ) -> Document:
        while True:
            if self._samples is None:
                self._samples = iter_raw_samples(self._url())
            unit = self._unit()
            try:
                raw = next(self._samples)
            except StopIteration:
                self._next_unit(counters)
                continue
            except SampleError as error:
                # Every stream reading a slice of a broken shard meets the break: the one whose
                # slice holds the sample it cost counts it (once per epoch, not once a slice).
                if error.index is None or error.index % unit.parts == unit.part:
                    self._defect(error, counters)
                self._next_unit(counters)
                continue
            if raw.index < self.offset:
                continue  # resuming: already consumed before the checkpoint
            self.offset = raw.index + 1
            if raw.index % unit.parts != unit.part:
                continue  # another stream's slice of this shard
            try:
                if raw.defect is not None:
                    raise SampleError(raw.defect, SPLIT_KEY, raw.key)
                document = builder.build(self.source.format, raw, rng)
            except SampleError as error:
                error.key = raw.key
                self._defect(error, counters)
                continue
            self.epoch_documents += 1
            self._unit_documents += 1
            return document


class Stream:
    def __init__(self, stream_id: int, spec: PipelineSpec, builder: DocumentBuilder):
        self.id, self.spec, self.builder = stream_id, spec, builder
        self.readers = [
            SourceReader(
                src,
                assign_units(len(src.shards), spec.num_streams, spec.seed, src.index)[stream_id],
                source_units(len(src.shards), spec.num_streams),
                stream_id,
                spec,
            )
            for src in spec.sources
        ]
        weights = np.array([src.weight for src in spec.sources], dtype=np.float64)
        self._cumulative = np.cumsum(weights / weights.sum())
        self.rng = np.random.Generator(np.random.PCG64([spec.seed, stream_id, _RNG_TAG]))
        self.packer = Packer(spec.row_len, spec.whole_documents, spec.pad_id)
        self.skipped = dict.fromkeys(REASONS, 0)
        self.documents = 0

    def _next_document(self) -> Document:
        source = 0
        if len(self.readers) > 1:
            source = int(np.searchsorted(self._cumulative, self.rng.random(), side="right"))
            source = min(source, len(self.readers) - 1)
        document = self.readers[source].next_document(self.builder, self.rng, self.skipped)
        self.documents += 1
        return document

    def rows(self, num_rows: int) -> dict[str, np.ndarray]:
        """The next `num_rows` packed rows: tokens, modality, doc and position ids, [R, T]."""
        out = []
        for _ in range(num_rows):
            while not self.packer.has_row():
                self.packer.push(self._next_document())
            out.append(self.packer.pop_row())
        names = ("tokens", "modality", "doc", "position")
        return {name: np.stack([row[i] for row in out]) for i, name in enumerate(names)}

    def state_dict(self) -> dict:
        return {
            "sources": [reader.state_dict() for reader in self.readers],
            "packer": self.packer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "skipped": dict(self.skipped),
            "documents": self.documents,
        }

    def load_state_dict(self, state: dict) -> None:
        assert len(state["sources"]) == len(self.readers)
        for reader, reader_state in zip(self.readers, state["sources"]):
            reader.load_state_dict(reader_state)
        self.packer.load_state_dict(state["packer"])
        self.rng.bit_generator.state = state["rng"]
        self.skipped = {r: int(state["skipped"].get(r, 0)) for r in REASONS}
        self.documents = int(state["documents"])
