"""The step's loss is the mean over every loss-bearing token of the global batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm_moe.data.config import DataConfig
from mm_moe.modality import IMAGE, TEXT
from mm_moe.model.config import ModelConfig
from mm_moe.trainer.config import TrainerConfig
from mm_moe.trainer.guard import StepGuard, TrainingHalted
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


class _NaNGradEngine(_LocalEngine):
    """Finite loss, one non-finite gradient; `sharded`: the optimizer computes the grad norm
    (ZeRO-1/2, bf16), so the step cannot read finiteness from its own norm."""

    def __init__(self, module, sharded: bool):
        super().__init__(module)
        if sharded:
            self.optimizer = type("Sharded", (), {"_global_grad_norm": None})()

    def backward(self, loss, scale_wrt_gas=True):
        super().backward(loss, scale_wrt_gas)
        next(self.module.parameters()).grad[0] = float("nan")


@pytest.mark.parametrize("sharded", [False, True], ids=["norm_in_step", "norm_in_optimizer"])
def test_a_nonfinite_gradient_with_a_finite_loss_stops_the_step(sharded):
    """The guard sees a NaN gradient whose loss is finite, whether the step computes the grad
    norm (ZeRO-0 in fp32: read from the norm) or the optimizer does (a pass over the grads)."""
    loader = DataConfig(seq_len=16).build(
        seed=1, rank=0, dp_world_size=1, micro_batch_size=2, global_batch_size=2
    )
    torch.manual_seed(0)
    model = (
        ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16, max_seq_len=32)
        .with_vocab(loader.vocab.size)
        .build()
    )
    guard = StepGuard(TrainerConfig(on_nonfinite="stop"))
    with pytest.raises(TrainingHalted, match="non-finite gradients on rank"):
        train_step(
            _NaNGradEngine(model, sharded),
            loader.micro_batches(0),
            z_loss=0.0,
            dp_world_size=1,
            device=torch.device("cpu"),
            guard=guard,
        )


def test_a_groups_statistics_average_over_its_tokens_not_over_micro_batches():
    """A micro-batch without image tokens reports the image group's statistics as zeros (so
    every rank has the same keys); the step's figure is the mean over the group's tokens of
    the step, not pulled towards zero by that micro-batch. The router rows' cosine needs no
    tokens and averages over every micro-batch."""
    from mm_moe.model.moe.config import MoEConfig

    loader = DataConfig(seq_len=32).build(
        seed=3, rank=0, dp_world_size=1, micro_batch_size=2, global_batch_size=6
    )
    batches = loader.micro_batches(0)
    batches[0].modality_ids_BS.fill_(TEXT)  # no image tokens in the first micro-batch
    torch.manual_seed(0)
    moe = MoEConfig(experts_per_modality={"text": 2, "image": 2})
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32)
    model = cfg.with_vocab(loader.vocab.size).build(moe).train()
    stats = train_step(
        _LocalEngine(model), batches, z_loss=0.0, dp_world_size=1, device=torch.device("cpu")
    )
    alone = []  # each micro-batch's own statistics (the weights did not move: no optimizer)
    with torch.no_grad():
        for b in batches:
            out = model(b.input_ids_BS, b.modality_ids_BS, b.doc_ids_BS, b.position_ids_BS)
            alone.append({k: v.item() for k, v in out.stats.items() if v.dim() == 0})
    group = "moe/l0/image"
    tokens = [s[f"{group}/tokens"] for s in alone]
    assert tokens[0] == 0 and sum(tokens) > 0
    for name in ("gate_mean", "taken_0", "dropped", "router_entropy"):
        want = sum(s[f"{group}/{name}"] * t for s, t in zip(alone, tokens)) / sum(tokens)
        assert stats[f"{group}/{name}"] == pytest.approx(want, rel=1e-5), name
    plain = sum(s[f"{group}/gate_mean"] for s in alone) / len(alone)
    assert stats[f"{group}/gate_mean"] > plain * 1.2  # what the equal mean read
    cosine = [s[f"{group}/router_cosine"] for s in alone]
    assert stats[f"{group}/router_cosine"] == pytest.approx(sum(cosine) / 3, rel=1e-5)
    assert cosine[0] == pytest.approx(cosine[1], rel=1e-5) and cosine[0] != 0
