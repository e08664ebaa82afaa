"""Incremental decoding with a KV cache gives the logits of a forward over the whole prefix."""

from __future__ import annotations

import pytest
import torch

from mm_moe.model.kv_cache import KVCache, supports_kv_cache
from mm_moe.sampling import Decoding
from tests.unit.test_model_variants import VARIANTS

CACHED = sorted(name for name in VARIANTS if "mod" not in name)


def _model(name: str, seed: int = 0):
    cfg, moe = VARIANTS[name]
    torch.manual_seed(seed)
    model = cfg.build(moe).eval()
    with torch.no_grad():  # larger weights than init: routing and attention that differ by row
        for p in model.parameters():
            p.mul_(4.0)
    return model


@pytest.mark.parametrize("name", CACHED)
def test_cached_decoding_equals_full_forwards(name):
    model = _model(name)
    assert supports_kv_cache(model)
    g = torch.Generator().manual_seed(1)
    ids_RS = torch.randint(0, 61, (3, 7), generator=g)
    mod_RS = (torch.rand(3, 7, generator=g) < 0.5).long()
    cached, full = Decoding(model, ids_RS, mod_RS), Decoding(model, ids_RS, mod_RS, cache=False)
    assert cached.cache is not None and full.cache is None
    with torch.no_grad():
        for step in range(8):
            got, want = cached.logits(), full.logits()
            # fp32 rounding of attention summed in another order, relative to the logits' size
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5 * scale)
            # One token most steps; three at once (a causal block after the cached keys) once.
            for _ in range(3 if step == 4 else 1):
                nxt_R1 = torch.randint(0, 61, (3, 1), generator=g)
                mod_R1 = (torch.rand(3, 1, generator=g) < 0.5).long()
                cached.append(nxt_R1, mod_R1)
                full.append(nxt_R1, mod_R1)
    assert cached.cache.length == full.ids_RS.shape[1] - 1  # the last token not run yet


def test_cached_positions_continue_and_stop_at_max_seq_len():
    model = _model("dense")
    cache = KVCache()
    ids_RS = torch.randint(0, 61, (1, 60))
    with torch.no_grad():
        model(ids_RS, kv_cache=cache)
        assert cache.length == 60 and cache.keys[0].shape[2] == 60
        model(ids_RS[:, :4], kv_cache=cache)  # positions 60-63: the last ones there are
        with pytest.raises(ValueError, match="65 positions exceed model.max_seq_len=64"):
            model(ids_RS[:, :1], kv_cache=cache)


def test_mixture_of_depths_decodes_without_a_cache():
    """A MoD layer's keys exist only for the tokens it took: no cache. Each step of the
    uncached decode (the prefix so far) gives the logits that one forward over the finished
    rows has at that position: eval-mode routing (auxiliary routers) is causal."""
    model = _model("moma_mod", seed=4)  # seed 4: layer 2 takes part of the tokens, not all
    assert not supports_kv_cache(model)
    g = torch.Generator().manual_seed(3)
    ids_RS = torch.randint(0, 61, (2, 9), generator=g)
    mod_RS = (torch.rand(2, 9, generator=g) < 0.5).long()
    decoding = Decoding(model, ids_RS, mod_RS)
    assert decoding.cache is None
    with pytest.raises(ValueError, match="mixture-of-depths"):
        model(ids_RS, mod_RS, kv_cache=KVCache())
    steps = []
    with torch.no_grad():
        for _ in range(5):
            steps.append(decoding.logits())
            nxt_R1 = torch.randint(0, 61, (2, 1), generator=g)
            decoding.append(nxt_R1, (torch.rand(2, 1, generator=g) < 0.5).long())
        model.collect_stats = True  # the MoD layers' selected fractions (off in eval mode)
        whole = model(decoding.ids_RS, decoding.mod_RS)
    selected = [float(v) for k, v in whole.stats.items() if k.endswith("/selected")]
    assert any(0 < v < 1 for v in selected), selected  # a real subset is routed
    for i, got in enumerate(steps):
        want = whole.logits[:, ids_RS.shape[1] - 1 + i].float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["dense", "moma_ec", "mot_moma", "moma_mod"])
def test_captions_after_cached_prefixes_equal_whole_rows(name):
    """Zero-shot scoring: each prefix runs once and every caption continues from its cache; the
    scores equal a forward over prefix + caption per row (MoD models take that path)."""
    from mm_moe.eval.zero_shot import caption_logprobs, captions_after_prefixes
    from mm_moe.tokenization.vocab import Vocab

    vocab = Vocab(
        text_size=40, image_offset=40, image_size=16, bos=56, eos=57, pad=58, boi=59, eoi=60,
        size=61,
    )  # fmt: skip
    model = _model(name)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(40, 56, (5, 6), generator=g).tolist()
    prefixes = [[vocab.bos, vocab.boi, *c, vocab.eoi] for c in codes]
    captions = [torch.randint(0, 40, (n,), generator=g).tolist() + [vocab.eos] for n in (1, 4, 2)]
    got = captions_after_prefixes(model, vocab, prefixes, captions, batch=2)
    rows = [(p, c) for p in prefixes for c in captions]
    want = caption_logprobs(model, vocab, [p for p, _ in rows], [c for _, c in rows])
    assert got.shape == (5, 3)
    # fp32 sums in another order: relative error ~1e-6 of scores of about -20
    torch.testing.assert_close(
        torch.from_numpy(got).flatten(), torch.tensor(want).double(), rtol=1e-5, atol=1e-4
    )
