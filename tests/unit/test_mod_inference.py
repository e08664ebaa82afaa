"""Mixture-of-depths at inference: the auxiliary router's selection sets the slot count K,
rounded up to a few sizes so that a compiled block is not recompiled for every count."""

from __future__ import annotations

from dataclasses import replace

import torch

from mm_moe.model import mod
from mm_moe.model.config import MoDConfig
from tests.unit.test_host_syncs import BASE, MOMA_EC


def test_inference_slots_take_a_few_sizes_and_leave_the_output_unchanged(monkeypatch):
    S = 64
    sizes = {mod.eval_slots(selected, S) for selected in range(S + 1)}
    assert len(sizes) <= mod.EVAL_SLOT_SIZES and max(sizes) == S
    assert all(mod.eval_slots(selected, S) >= selected for selected in range(S + 1))

    torch.manual_seed(0)
    model = replace(BASE, mod=MoDConfig(layers=[1], capacity=0.5)).build(MOMA_EC).eval()
    aux = model.layers[1].aux_router
    logits = []
    handle = aux.register_forward_hook(lambda m, args, out: logits.append(out))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (3, S), generator=g)
    modality = (torch.rand(3, S, generator=g) < 0.5).long()
    taken = []
    rounded = mod.eval_slots
    monkeypatch.setattr(
        mod, "eval_slots", lambda n, S: taken.append((n, rounded(n, S))) or rounded(n, S)
    )
    with torch.no_grad():
        model(ids, modality)  # an untrained auxiliary router selects nothing: select about 40%
        aux.net[2].bias -= logits[0].quantile(0.6)
        handle.remove()
        taken.clear()
        padded = model(ids, modality).logits
        monkeypatch.setattr(mod, "eval_slots", lambda n, S: max(1, n))
        exact = model(ids, modality).logits
    ((selected, slots),) = taken
    assert 0 < selected < slots  # the rounding added slots here
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)
