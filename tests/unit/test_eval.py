"""Held-out evaluation (inference vs training routing), the multimodal evaluations, config."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mm_moe.config import ConfigError, TrainConfig, from_dict
from mm_moe.data.config import DataConfig, SourceConfig
from mm_moe.eval.config import EvalConfig
from mm_moe.eval.heldout import HeldoutEval, heldout_batches
from mm_moe.model.config import ModelConfig
from mm_moe.model.losses import per_token_losses
from mm_moe.model.moe.config import MoEConfig
from mm_moe.tokenization.config import TokenizerConfig

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64)


def _synthetic_batches(micro=4, num_batches=2):
    cfg = EvalConfig(interval=1, num_batches=num_batches, micro_batch_size=micro)
    data = DataConfig(seq_len=32)
    return heldout_batches(cfg, data, TokenizerConfig(), 0, 1, micro)


def test_heldout_matches_reference_and_leaves_training_untouched():
    batches = _synthetic_batches()
    vocab = batches[0].input_ids_BS.max().item() + 1
    # aux-loss-free balancing (token choice) counts loads in training-mode forwards
    balanced = MoEConfig(
        experts_per_modality={"text": 2, "image": 2},
        router="token_choice",
        router_noise=1.0,
        bias_update_rate=0.01,
    )
    model = TINY.with_vocab(vocab).build(balanced).train()
    model.layers[0].ffn.load_accum.fill_(3.0)
    rng = torch.get_rng_state()
    HeldoutEval(batches, torch.device("cpu"))(model)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert torch.all(model.layers[0].ffn.load_accum == 3.0)

    moe = MoEConfig(experts_per_modality={"text": 2, "image": 2}, router_noise=1.0)
    model = TINY.with_vocab(vocab).build(moe).train()
    rng = torch.get_rng_state()
    out = HeldoutEval(batches, torch.device("cpu"))(model)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    # reference: mean cross-entropy per target modality, eval mode (aux routers)
    model.eval()
    sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for b in batches:
            logits = model(
                b.input_ids_BS, b.modality_ids_BS, b.doc_ids_BS, b.position_ids_BS, b.loss_mask_BS
            ).logits
            ce, _ = per_token_losses(logits, b.target_ids_BS, 0.0)
            for m in (0, 1):
                sel = b.loss_mask_BS & (b.target_modality_ids_BS == m)
                sums[m] += float(ce[sel].sum())
                counts[m] += int(sel.sum())
    assert out["eval/loss_text"] == pytest.approx(sums[0] / counts[0], rel=1e-6)
    assert out["eval/loss_image"] == pytest.approx(sums[1] / counts[1], rel=1e-6)
    assert out["eval/ppl_image"] == pytest.approx(math.exp(out["eval/loss_image"]))
    gap = out["eval/loss_text"] - out["eval/train_routing/loss_text"]
    assert out["eval/routing_gap_text"] == pytest.approx(gap)
    assert gap != 0.0  # expert choice over the batch vs the untrained aux routers
    # Training routing's aux-router accuracy: each layer and group's, over training-mode
    # forwards from the same RNG state (router noise), over the group's tokens of every batch
    # (moe/stat_means.py), then averaged over layers and groups.
    model.train()
    hits: dict[str, float] = {}
    tokens: dict[str, float] = {}
    with torch.no_grad():
        for b in batches:
            stats = model(*b.model_inputs()).stats
            for k, v in stats.items():
                if k.endswith("/aux_router_acc"):
                    n = float(stats[k.replace("/aux_router_acc", "/tokens")])
                    hits[k] = hits.get(k, 0.0) + float(v) * n
                    tokens[k] = tokens.get(k, 0.0) + n
    assert len(hits) == TINY.n_layers * 2
    want = sum(hits[k] / tokens[k] for k in hits) / len(hits)
    assert out["eval/train_routing/aux_router_acc"] == pytest.approx(want, rel=1e-6)


def test_heldout_dense_has_no_gap_and_fixed_rows():
    a, b = _synthetic_batches(), _synthetic_batches()
    assert all(torch.equal(x.input_ids_BS, y.input_ids_BS) for x, y in zip(a, b))
    model = TINY.with_vocab(int(a[0].input_ids_BS.max()) + 1).build()
    out = HeldoutEval(a, torch.device("cpu"))(model)
    assert out["eval/routing_gap_text"] == 0.0 and out["eval/routing_gap_image"] == 0.0
    # Training routing is scored for dense models too: a training-mode forward that differs
    # from the inference one shows up as a gap.
    noisy = lambda module, args, out: out * 2.0 if module.training else out
    model.lm_head.register_forward_hook(noisy)
    out = HeldoutEval(a, torch.device("cpu"))(model)
    assert out["eval/routing_gap_text"] != 0.0 and out["eval/routing_gap_image"] != 0.0


def test_eval_config_errors():
    with pytest.raises(ValueError, match=r"\{label\}"):
        EvalConfig(zero_shot=replace(EvalConfig().zero_shot, templates=["a digit"]))
    with pytest.raises(ValueError, match="eval.interval"):
        EvalConfig(interval=-1)
    with pytest.raises(ValueError, match="rerank must be >= 1"):
        EvalConfig(text_to_image=replace(EvalConfig().text_to_image, rerank=0))
    bad = {
        "data": {"source": "webdataset", "sources": [{"urls": "x", "format": "pairs"}]},
        "eval": {"interval": 5},
    }
    with pytest.raises(ConfigError, match="eval.sources"):
        from_dict(TrainConfig, bad)
    with pytest.raises(ConfigError, match="eval.intervall"):
        from_dict(TrainConfig, {"eval": {"intervall": 5}})


def test_zero_shot_is_chance_for_an_untrained_model(demo_assets):
    """An untrained model classifies 250 held-out digits at chance: within 3 binomial standard
    deviations of 10%."""
    from mm_moe.eval.labelled import labelled_images
    from mm_moe.eval.zero_shot import zero_shot_classify

    tok_dir, heldout = demo_assets
    tok_cfg = TokenizerConfig(text="sentencepiece", image="vq", path=str(tok_dir))
    tok = tok_cfg.build()
    torch.manual_seed(0)
    model = TINY.with_vocab(tok.vocab.size).build(MoEConfig(experts_per_modality={"mixed": 2}))
    images = labelled_images(str(heldout), 250, "heldout", 10)
    labels = [str(d) for d in range(10)]
    r = zero_shot_classify(model, tok, images, labels, ["a handwritten digit {label}"], 25)
    n = r["num_images"]
    assert n == 250
    band = 3 * math.sqrt(0.1 * 0.9 / n)
    assert abs(r["accuracy"] - 0.1) <= band, r["accuracy"]


def test_text_to_image_and_judge(tmp_path, demo_assets):
    from mm_moe.eval.multimodal import multimodal_evals

    tok_dir, heldout = demo_assets
    tok_cfg = TokenizerConfig(text="sentencepiece", image="vq", path=str(tok_dir))
    tok = tok_cfg.build()
    model = TINY.with_vocab(tok.vocab.size).build()
    cfg = EvalConfig(sources=[SourceConfig(str(heldout), "pairs")])
    cfg = replace(
        cfg,
        zero_shot=replace(cfg.zero_shot, num_samples=10),
        text_to_image=replace(
            cfg.text_to_image,
            samples_per_label=2,
            classifier_steps=60,
            cache_dir=str(tmp_path / "cache"),
            grid_samples=2,
        ),
    )
    r = multimodal_evals(model, tok, tok_cfg, cfg, tmp_path)
    assert r["judge_accuracy"] > 0.5  # a real classifier of real digits
    assert r["text_to_image"]["num_images"] == 20
    t2i = r["text_to_image"]
    assert t2i["intended"] == [c for c in range(10) for _ in range(2)]
    # Recounted: the cached judge on the decoded codes gives the predictions and the accuracy.
    from mm_moe.eval.judge import load_or_train_judge
    from mm_moe.tokenization.interface import decode_images

    t2i_cfg = cfg.text_to_image
    judge, _ = load_or_train_judge(
        tok, tok_cfg, cfg.labelled_urls(), 10, t2i_cfg.classifier_steps, t2i_cfg.cache_dir
    )
    assert judge.predict(decode_images(tok.image, t2i["codes"])) == t2i["predicted"]
    hits = sum(p == c for p, c in zip(t2i["predicted"], t2i["intended"]))
    assert t2i["accuracy"] == hits / 20
    assert (tmp_path / "text_to_image.png").is_file()
    assert list((tmp_path / "cache").glob("judge_*.pt"))  # cached: the second call loads it
    again = multimodal_evals(model, tok, tok_cfg, cfg, tmp_path)
    assert again["judge_accuracy"] == r["judge_accuracy"]


def test_captions_equal_one_image_at_a_time_greedy_decoding(demo_assets):
    """Batched captioning equals a naive greedy loop per image; the accuracy counts captions
    naming exactly the right class."""
    from mm_moe.eval.captioning import caption_accuracy, named_classes, sample_captions
    from mm_moe.eval.labelled import labelled_images
    from mm_moe.eval.zero_shot import image_prefix

    tok_dir, heldout = demo_assets
    tok = TokenizerConfig(text="sentencepiece", image="vq", path=str(tok_dir)).build()
    torch.manual_seed(0)
    model = TINY.with_vocab(tok.vocab.size).build(MoEConfig(experts_per_modality={"mixed": 2}))
    images = labelled_images(str(heldout), 3, "heldout", 10)
    got = sample_captions(model.eval(), tok, [im for im, _ in images], 5, 0.0, 0)
    vocab = tok.vocab
    for caption, (image, _) in zip(got, images):
        ids = image_prefix(tok, image)
        new = []
        for _ in range(5):
            mod = vocab.modality_of(ids).tolist()
            logits = model(torch.tensor([ids]), torch.tensor([mod])).logits[0, -1]
            banned = vocab.image_id_mask() | torch.isin(
                torch.arange(vocab.size),
                torch.tensor([vocab.pad, vocab.bos, vocab.eoi, vocab.boi]),
            )
            nxt = int(logits.masked_fill(banned, float("-inf")).argmax())
            ids.append(nxt)
            new.append(nxt)
        new = new[: new.index(vocab.eos)] if vocab.eos in new else new
        assert caption == tok.text.decode(new)

    names = [[str(d), w] for d, w in enumerate(["zero", "one", "two"])]
    assert named_classes("A handwritten Two.", names) == {2}
    assert named_classes("the digit 1 or one", names) == {1}
    assert named_classes("2 and 0", names) == {0, 2}
    assert named_classes("twenty", names) == set()
    r = caption_accuracy(model, tok, images, [[str(d)] for d in range(10)], 5)
    assert r["num_images"] == 3 and len(r["captions"]) == 3
    expected = [
        named_classes(c, [[str(d)] for d in range(10)]) == {lb}
        for c, (_, lb) in zip(r["captions"], images)
    ]
    assert r["accuracy"] == sum(expected) / 3


def test_guided_image_sampling_equals_a_naive_loop(demo_assets):
    """Classifier-free guidance, greedy (top_k=1): each code is the argmax over image codes of
    log p(x | caption) + (g - 1)(log p(x | caption) - log p(x | no caption)), computed row by
    row; guidance 1 is plain sampling, and guidance changes the images."""
    from mm_moe.eval.text_to_image import caption_prompt, sample_image_codes

    tok, model = _tiny_mixed_moe(demo_assets)
    vocab, g = tok.vocab, 3.0
    prompts = [caption_prompt(tok, "a handwritten digit 3"), caption_prompt(tok, "7")]
    got = sample_image_codes(model, tok, prompts, 1.0, 1, 0, guidance=g)
    plain = sample_image_codes(model, tok, prompts, 1.0, 1, 0)
    image_ids = torch.nonzero(vocab.image_id_mask()).flatten()

    def logprobs(ids):
        logits = model(torch.tensor([ids]), torch.tensor([vocab.modality_of(ids).tolist()]))
        return torch.log_softmax(logits.logits[0, -1, image_ids].float(), -1)

    for prompt, codes, plain_codes in zip(prompts, got, plain):
        cond, free, want, want_plain = list(prompt), [vocab.bos, vocab.boi], [], []
        for _ in range(tok.image.tokens_per_image):
            lp_c, lp_u = logprobs(cond), logprobs(free)
            nxt = int(image_ids[int((lp_u + g * (lp_c - lp_u)).argmax())])
            cond.append(nxt)
            free.append(nxt)
            want.append(nxt)
        ids = list(prompt)
        for _ in range(tok.image.tokens_per_image):
            ids.append(int(image_ids[int(logprobs(ids).argmax())]))
            want_plain.append(ids[-1])
        assert codes == vocab.image_codes(want).tolist()
        assert plain_codes == vocab.image_codes(want_plain).tolist()
    assert got != plain


def test_reranking_keeps_the_candidate_whose_caption_the_model_finds_most_likely(demo_assets):
    """rerank=K: the kept image of each caption is, among the K candidates sampled for it, the
    one after which a naive forward gives the caption the highest log-likelihood; the first
    candidates alone are the plain samples (accuracy_single)."""
    from mm_moe.eval.text_to_image import sample_image_codes, text_to_image_eval

    tok, model = _tiny_mixed_moe(demo_assets)
    with torch.no_grad():  # larger weights: captions whose likelihood depends on the image
        for p in model.parameters():
            p.mul_(4.0)
    vocab, K = tok.vocab, 3

    class Judge:  # reads every image as class 0
        def predict(self, images):
            return [0] * len(images)

    labels, template = ["3", "7"], "a handwritten digit {label}"
    r = text_to_image_eval(model, tok, Judge(), labels, template, 2, 1.0, 0, 5, None, 0, 2.0, K)
    prompts = [
        [vocab.bos, *tok.text.encode(template.format(label=lb)), vocab.boi]
        for lb in labels
        for _ in range(2)
    ]
    candidates = sample_image_codes(model, tok, prompts * K, 1.0, 0, 5, 2.0)
    P = len(prompts)

    def caption_logprob(codes, caption):
        ids = [vocab.bos, vocab.boi, *vocab.image_token_ids(torch.tensor(codes)).tolist()]
        ids += [vocab.eoi, *caption]
        mod = torch.tensor([vocab.modality_of(ids).tolist()])
        logp = torch.log_softmax(model(torch.tensor([ids]), mod).logits[0].float(), -1)
        start = len(ids) - len(caption)
        return sum(float(logp[start - 1 + j, t]) for j, t in enumerate(caption))

    for i, prompt in enumerate(prompts):
        caption = prompt[1:-1]
        scores = [caption_logprob(candidates[k * P + i], caption) for k in range(K)]
        kept = scores[[candidates[k * P + i] for k in range(K)].index(r["codes"][i])]
        assert max(scores) - min(scores) > 0.05  # the choice matters
        assert kept == pytest.approx(max(scores), abs=1e-4)  # batched vs one row: rounding
    assert len({tuple(c) for c in candidates}) > P  # the candidates differ
    assert r["accuracy"] == r["accuracy_single"] == 0.5 and r["rerank"] == K


def _tiny_mixed_moe(demo_assets):
    """The demo tokenizers and an untrained tiny model with 2 mixed experts, in eval mode."""
    tok_dir, _ = demo_assets
    tok = TokenizerConfig(text="sentencepiece", image="vq", path=str(tok_dir)).build()
    torch.manual_seed(0)
    model = TINY.with_vocab(tok.vocab.size).build(MoEConfig(experts_per_modality={"mixed": 2}))
    return tok, model.eval()


def test_heldout_eval_of_a_dense_model_makes_one_host_sync():
    """The sums stay on the device (weighted sums, no boolean indexing per batch) and come to
    the host in one copy with the statistics: a dense model's held-out eval syncs once per
    pass (inference routing, then training routing)."""
    from mm_moe.utils.host_syncs import HostSyncCounter

    batches = _synthetic_batches(num_batches=3)
    vocab = max(int(b.input_ids_BS.max()) for b in batches) + 1
    model = TINY.with_vocab(vocab).build(None).train()
    with HostSyncCounter() as syncs:
        out = HeldoutEval(batches, torch.device("cpu"))(model)
    assert syncs.total == 2, dict(syncs.by_op)
    assert math.isfinite(out["eval/loss_image"]) and math.isfinite(out["eval/loss_text"])


def test_the_heldout_set_is_the_same_at_every_world_size():
    """The held-out set is what one process reads (eval.num_batches micro-batches of the
    world-size-1 micro-batch size), dealt to the ranks: a run resumed on other ranks scored
    other rows (4x the tokens at 4 ranks), so its eval curve jumped. Every rank runs as many
    micro-batches (expert parallelism's lockstep); the padding rows hold no loss and their
    batches no statistics: an MoE's held-out loss is the same whatever the world size."""
    cfg = EvalConfig(interval=1, num_batches=3)
    data = DataConfig(seq_len=32)
    rows = lambda bs: sorted(  # noqa: E731
        tuple(r.tolist())
        for b in bs
        for r, keep in zip(b.input_ids_BS, b.loss_mask_BS.any(1))
        if keep
    )
    one = heldout_batches(cfg, data, TokenizerConfig(), 0, 1, 4, 4)
    assert len(one) == 3 and all(b.input_ids_BS.shape[0] == 4 for b in one)
    moe = MoEConfig(experts_per_modality={"text": 2, "image": 2})
    torch.manual_seed(0)
    vocab = max(int(b.input_ids_BS.max()) for b in one) + 1
    model = TINY.with_vocab(vocab).build(moe)
    want = HeldoutEval(one, torch.device("cpu"))(model)
    for ranks, micro in ((2, 2), (3, 2), (5, 1)):  # 12 rows: 6, 4 and 2-3 per rank
        dealt = [
            heldout_batches(cfg, data, TokenizerConfig(), r, ranks, micro, 4) for r in range(ranks)
        ]
        assert len({len(d) for d in dealt}) == 1  # lockstep
        assert rows(b for d in dealt for b in d) == rows(one)
        # every rank's batches scored on one process: the sums of an all-reduce
        got = HeldoutEval([b for d in dealt for b in d], torch.device("cpu"))(model)
        for key in ("eval/loss_text", "eval/loss_image", "eval/tokens_text", "eval/unprocessed"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (ranks, key)


def test_a_bad_heldout_source_is_named_as_eval_sources(tmp_path):
    from mm_moe.errors import UserError

    missing = SourceConfig(urls=str(tmp_path / "nowhere.tar"), format="pairs")
    cfg = EvalConfig(interval=1, sources=[missing])
    with pytest.raises(UserError, match=r"^eval\.sources\[0\]\.urls: shard .*nowhere.tar"):
        heldout_batches(cfg, DataConfig(seq_len=32), TokenizerConfig(), 0, 1, 2)
