"""Packing documents into rows of T = seq_len + 1 tokens, with nothing lost or duplicated.

Documents are concatenated in order and cut every T tokens; a document longer than what is left
of a row continues at the start of the next row. With `whole_documents`, a document that fits in
a row but not in what is left of the current one starts the next row instead, the rest of the
current row padded (pad tokens, masked from the loss): a caption is never cut off from its
image, at the cost of the padding. Per row:
- doc ids number the document segments in the row from 0 (attention stays inside one);
- position ids restart at 0 at each segment start, including a continued document's first
  token in a new row, so positions never exceed seq_len (RoPE tables stay in range).
The leftover of the last document is the packing buffer; it goes into the loader's state.
"""

from __future__ import annotations

import base64

import numpy as np

from mm_moe.data.documents import Document


def _encode(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _decode(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


class Packer:
    def __init__(self, row_len: int, whole_documents: bool = False, pad_id: int = 0):
        self.row_len = row_len
        self.whole_documents, self.pad_id = whole_documents, pad_id
        self._tokens: list[np.ndarray] = []
        self._modality: list[np.ndarray] = []
        self._starts: list[np.ndarray] = []  # True where a document begins
        self.size = 0

    def push(self, doc: Document) -> None:
        assert len(doc.tokens) == len(doc.modality) > 0
        left = -self.size % self.row_len
        if self.whole_documents and left < len(doc.tokens) <= self.row_len and left:
            starts = np.zeros(left, dtype=bool)
            starts[0] = True  # one segment of padding
            self._append(np.full(left, self.pad_id, np.int32), np.zeros(left, np.uint8), starts)
        starts = np.zeros(len(doc.tokens), dtype=bool)
        starts[0] = True
        self._append(doc.tokens, doc.modality, starts)

    def _append(self, tokens: np.ndarray, modality: np.ndarray, starts: np.ndarray) -> None:
        self._tokens.append(tokens)
        self._modality.append(modality)
        self._starts.append(starts)
        self.size += len(tokens)

    def has_row(self) -> bool:
        return self.size >= self.row_len

    def _flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        empty = (np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, bool))
        if not self._tokens:
            return empty
        return tuple(
            np.concatenate(parts) for parts in (self._tokens, self._modality, self._starts)
        )

    def pop_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """[T] tokens, modality, doc ids and position ids of the next row."""
        assert self.has_row()
        tokens, modality, starts = self._flat()
        t = self.row_len
        self._tokens, self._modality, self._starts = [tokens[t:]], [modality[t:]], [starts[t:]]
        self.size -= t
        segment_T = starts[:t].copy()
        segment_T[0] = True
        doc_T = np.cumsum(segment_T) - 1
        index_T = np.arange(t)
        position_T = index_T - np.maximum.accumulate(np.where(segment_T, index_T, 0))
        return tokens[:t], modality[:t], doc_T, position_T

    def state_dict(self) -> dict:
        tokens, modality, starts = self._flat()
        return {
            "tokens": _encode(tokens, "<i4"),
            "modality": _encode(modality, "u1"),
            "starts": _encode(starts, "u1"),
        }

    def load_state_dict(self, state: dict) -> None:
        tokens = _decode(state["tokens"], "<i4").astype(np.int32)
        modality = _decode(state["modality"], "u1")
        starts = _decode(state["starts"], "u1").astype(bool)
        assert len(tokens) == len(modality) == len(starts)
        self._tokens, self._modality, self._starts = [tokens], [modality], [starts]
        self.size = len(tokens)
