"""The training batch every data source produces.

Shape legend: B sequences, S positions. Targets are the inputs shifted by one; the loss mask
is false for padding and for targets that start a new document.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from mm_moe.modality import NUM_MODALITIES


@dataclass(frozen=True)
class TokenProfile:
    """What a batch asks of the hardware, counted on the host where it is built (for tokens/s
    and MFU without a device sync): its non-padding input tokens per modality, its positions
    (padding included), and the keys its real tokens attend to: `causal_keys` in a causal
    kernel over the whole row (row index + 1), `document_keys` inside their own document
    segment only (what a kernel that skips masked blocks, FlexAttention, computes)."""

    tokens_M: tuple[int, ...]
    positions: int
    causal_keys: int
    document_keys: int

    @classmethod
    def of(cls, modality_BS: np.ndarray, doc_BS: np.ndarray, valid_BS: np.ndarray):
        B, S = doc_BS.shape
        index_BS = np.broadcast_to(np.arange(S), (B, S))
        start_BS = np.ones((B, S), dtype=bool)
        start_BS[:, 1:] = doc_BS[:, 1:] != doc_BS[:, :-1]
        first_BS = np.maximum.accumulate(np.where(start_BS, index_BS, 0), axis=1)
        real = valid_BS.astype(bool)
        counts = np.bincount(modality_BS[real].astype(np.int64), minlength=NUM_MODALITIES)
        return cls(
            tokens_M=tuple(int(c) for c in counts[:NUM_MODALITIES]),
            positions=B * S,
            causal_keys=int((index_BS + 1)[real].sum()),
            document_keys=int((index_BS - first_BS + 1)[real].sum()),
        )

    def __add__(self, other: TokenProfile) -> TokenProfile:
        return TokenProfile(
            tuple(a + b for a, b in zip(self.tokens_M, other.tokens_M)),
            self.positions + other.positions,
            self.causal_keys + other.causal_keys,
            self.document_keys + other.document_keys,
        )

    @property
    def tokens(self) -> int:
        return sum(self.tokens_M)


@dataclass
class Batch:
    input_ids_BS: torch.Tensor
    target_ids_BS: torch.Tensor
    modality_ids_BS: torch.Tensor  # modality of each input token
    target_modality_ids_BS: torch.Tensor  # modality of each target token (for per-modality loss)
    loss_mask_BS: torch.Tensor  # bool
    doc_ids_BS: torch.Tensor  # document index inside the packed row (attention masking)
    position_ids_BS: torch.Tensor  # position inside the document (RoPE)
    # Every row holds one document: attention needs no document mask (the causal flash
    # path). Known on the host where the batch is built, so the forward needs no sync.
    one_document_per_row: bool = False
    # Host-side counts for tokens/s and MFU (None: not known, e.g. a batch built by hand).
    profile: TokenProfile | None = None

    @classmethod
    def from_tokens(
        cls,
        tokens_BT: np.ndarray,
        modality_BT: np.ndarray,
        doc_BT: np.ndarray,
        position_BT: np.ndarray,
        valid_BT: np.ndarray,
    ) -> Batch:
        """Build a batch from rows of S+1 packed tokens (T = S + 1)."""
        same_doc_BS = doc_BT[:, 1:] == doc_BT[:, :-1]
        loss_mask_BS = same_doc_BS & valid_BT[:, 1:] & valid_BT[:, :-1]
        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a)).long()
        return cls(
            input_ids_BS=as_long(tokens_BT[:, :-1]),
            target_ids_BS=as_long(tokens_BT[:, 1:]),
            modality_ids_BS=as_long(modality_BT[:, :-1]),
            target_modality_ids_BS=as_long(modality_BT[:, 1:]),
            loss_mask_BS=torch.from_numpy(np.ascontiguousarray(loss_mask_BS)),
            doc_ids_BS=as_long(doc_BT[:, :-1]),
            position_ids_BS=as_long(position_BT[:, :-1]),
            one_document_per_row=bool((doc_BT[:, :-1] == doc_BT[:, :1]).all()),
            profile=TokenProfile.of(modality_BT[:, :-1], doc_BT[:, :-1], valid_BT[:, :-1]),
        )

    def to(self, device: torch.device | str) -> Batch:
        move = lambda v: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def model_inputs(self) -> tuple:
        """The model's forward arguments: ids, modality ids, document ids (None when every
        row holds one document), positions, and the loss mask as the token mask."""
        doc_ids_BS = None if self.one_document_per_row else self.doc_ids_BS
        return (
            self.input_ids_BS,
            self.modality_ids_BS,
            doc_ids_BS,
            self.position_ids_BS,
            self.loss_mask_BS,
        )
