"""The streams of one rank as a torch IterableDataset: dataloader workers split the streams.

Worker w of n runs streams[w::n]; each item is one optimizer step's rows of every stream the
worker runs, with each stream's state after those rows. Every worker yields exactly one item per
step, so the DataLoader's round-robin order hands the main process the workers' items of step s
in worker order. Bad data under on_error=raise (a DataError) comes back as an ("error", message)
item rather than a traceback, so the main process can fail with a clean message.
"""

from __future__ import annotations

import itertools

from torch.utils.data import IterableDataset, get_worker_info

from mm_moe.data.defects import DataError
from mm_moe.data.documents import DocumentBuilder
from mm_moe.data.stream import PipelineSpec, Stream


def worker_streams(stream_ids: list[int], worker: int, num_workers: int) -> list[int]:
    return stream_ids[worker::num_workers]


class StreamsDataset(IterableDataset):
    def __init__(
        self,
        spec: PipelineSpec,
        stream_ids: list[int],
        states: dict[int, dict | None],
        rows_per_stream: int,
        start_step: int,
    ):
        super().__init__()
        self.spec, self.stream_ids, self.states = spec, stream_ids, states
        self.rows_per_stream, self.start_step = rows_per_stream, start_step

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        builder = DocumentBuilder(self.spec.tokenizer.build(), self.spec.decode)
        streams = []
        for stream_id in worker_streams(self.stream_ids, worker, num_workers):
            stream = Stream(stream_id, self.spec, builder)
            if self.states.get(stream_id) is not None:
                stream.load_state_dict(self.states[stream_id])
            streams.append(stream)
        for step in itertools.count(self.start_step):
            try:
                rows = {s.id: (s.rows(self.rows_per_stream), s.state_dict()) for s in streams}
            except DataError as exc:
                yield "error", str(exc)
                return
            yield step, rows


def identity(item):
    """The collate function: items are already per-step dicts of numpy arrays."""
    return item
