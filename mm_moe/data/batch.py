"""The training batch every data source produces.

Shape legend: B sequences, S positions. Targets are the inputs shifted by one; the loss mask
is false for padding and for targets that start a new document.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


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
