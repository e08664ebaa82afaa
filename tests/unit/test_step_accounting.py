"""The step's loss is the mean over every loss-bearing token of the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_moe.data.config import DataConfig
from mm_moe.modality import IMAGE, TEXT
from mm_moe.model.config import ModelConfig
from mm_moe.trainer.step import train_step


class _LocalEngine:
    """Just enough of DeepSpeed's engine interface for one process without sharding."""

    optimizer = None

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False
        loss.backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None


def test_micro_batch_sums_equal_global_token_mean():
    loader = DataConfig(seq_len=32).build(
        seed=1, rank=0, dp_world_size=1, micro_batch_size=2, global_batch_size=6
    )
    batches = loader.micro_batches(0)
    # Uneven loss-token counts per micro-batch: a mean of micro-batch means would be wrong.
    batches[0].loss_mask_BS[:, 5:] = False
    torch.manual_seed(0)
    model = (
        ModelConfig(
            d_model=32,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            ffn_hidden=32,
            max_seq_len=64,
            z_loss=0.0,
        )
        .with_vocab(loader.vocab.size)
        .build()
    )
    stats = train_step(
        _LocalEngine(model), batches, z_loss=0.0, dp_world_size=1, device=torch.device("cpu")
    )
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    ce, mod = [], []
    for b in batches:
        out = model(b.input_ids_BS, b.modality_ids_BS, b.doc_ids_BS, b.position_ids_BS)
        tok = F.cross_entropy(
            out.logits.flatten(0, 1), b.target_ids_BS.flatten(), reduction="none"
        ).view_as(b.target_ids_BS)
        ce.append(tok[b.loss_mask_BS])
        mod.append(b.target_modality_ids_BS[b.loss_mask_BS])
    ce, mod = torch.cat(ce), torch.cat(mod)
    ce.mean().backward()
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-5)
    assert abs(stats["loss"] - ce.mean().item()) < 1e-5
    assert abs(stats["loss_text"] - ce[mod == TEXT].mean().item()) < 1e-5
    assert abs(stats["loss_image"] - ce[mod == IMAGE].mean().item()) < 1e-5
    assert stats["tokens_loss"] == ce.numel()
    expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    assert abs(stats["grad_norm"] - expected_norm) < 1e-5
