"""What a load checks before it uses a checkpoint: the same function (weights-only loads name
every differing model/moe key)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from mm_moe.checkpoint.state import _check_same_architecture
from mm_moe.config import TrainConfig
from mm_moe.config.validate import to_dict
from mm_moe.errors import UserError
from mm_moe.model.config import ModelConfig
from mm_moe.model.moe.config import MoEConfig

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1)
# Cosine router logits: moe.cosine_router_scale acts only with them (refused with linear ones).
MOE = MoEConfig(
    experts_per_modality={"text": 2, "image": 2}, router="token_choice", router_logits="cosine"
)


def _weights_only_dir(tmp_path, model: ModelConfig, moe: MoEConfig):
    step = tmp_path / "step_00000000"
    step.mkdir(parents=True)
    config = to_dict(TrainConfig(model=model, moe=moe))
    (step / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return step


# Each changes the function of the same weights, and none changes a tensor's name or shape.
FUNCTION_CHANGES = [
    ("model.rope_theta", 500000.0),
    ("model.norm_placement", "post"),
    ("model.norm_eps", 1e-6),
    ("model.document_masking", False),
    ("moe.top_k", 2),
    ("moe.score", "softmax"),
    ("moe.router_logits", "linear"),
    ("moe.cosine_router_scale", 5.0),
    ("moe.renormalize", False),
]


@pytest.mark.parametrize("key,value", FUNCTION_CHANGES)
def test_weights_only_load_refuses_a_config_that_changes_the_function(tmp_path, key, value):
    step = _weights_only_dir(tmp_path, MODEL, MOE)
    group, name = key.split(".")
    model = replace(MODEL, **({name: value} if group == "model" else {}))
    moe = replace(MOE, **({name: value} if group == "moe" else {}))
    saved = getattr(MODEL if group == "model" else MOE, name)
    with pytest.raises(UserError) as err:
        _check_same_architecture(step, model.build(moe))
    message = str(err.value)
    assert f"{key}: checkpoint {saved!r}, this run {value!r}" in message
    assert message.count(": checkpoint ") == 1  # only the one key that differs


def test_weights_only_load_accepts_identical_and_training_only_differences(tmp_path):
    step = _weights_only_dir(tmp_path, MODEL, MOE)
    _check_same_architecture(step, MODEL.build(MOE))
    # losses, noise, initialisation and kernels do not change what the weights compute
    training_only = replace(MOE, router_noise=0.5, load_balance_coef=0.01, gemm="loop")
    _check_same_architecture(step, replace(MODEL, z_loss=1e-4, init_std=0.01).build(training_only))


def test_training_time_selection_may_change_and_balancing_may_be_turned_on(tmp_path):
    """Capacities (expert choice's top-C, token choice's drops, mixture-of-depths' top-k)
    select only in training: a fine-tune may change them. Aux-loss-free balancing may be
    turned on (its bias, never moved, is zero) but not off (a learned bias would be dropped)."""
    ec = replace(MOE, router="expert_choice", router_logits="linear", capacity_factor=1.0)
    mod = replace(MODEL, mod=replace(MODEL.mod, layers=[1], capacity=0.5))
    step = _weights_only_dir(tmp_path, mod, ec)
    wider = replace(mod, mod=replace(mod.mod, capacity=0.25))
    _check_same_architecture(step, wider.build(replace(ec, capacity_factor=2.0)))
    _check_same_architecture(step, wider.build(replace(ec, capacity_factor=0.5, top_k=2)))
    tc = _weights_only_dir(tmp_path / "tc", MODEL, MOE)
    _check_same_architecture(tc, MODEL.build(replace(MOE, bias_update_rate=0.01)))
    balanced = _weights_only_dir(tmp_path / "b", MODEL, replace(MOE, bias_update_rate=0.01))
    _check_same_architecture(balanced, MODEL.build(replace(MOE, bias_update_rate=0.05)))
    with pytest.raises(UserError, match="moe.bias_update_rate: checkpoint 0.01, this run 0.0"):
        _check_same_architecture(balanced, MODEL.build(MOE))


def test_lists_of_layers_and_untied_parts_compare_as_sets(tmp_path):
    written = replace(MODEL, untie=["attention", "norms"], mod=replace(MODEL.mod, layers=[0, 1]))
    step = _weights_only_dir(tmp_path, written, replace(MOE, layers=[0, 1]))
    reordered = replace(
        written, untie=["norms", "attention"], mod=replace(written.mod, layers=[1, 0])
    )
    _check_same_architecture(step, reordered.build(replace(MOE, layers=[1, 0])))
    with pytest.raises(UserError, match=r"moe\.layers: checkpoint \[0, 1\], this run \[1\]"):
        _check_same_architecture(step, reordered.build(replace(MOE, layers=[1])))


def test_a_checkpoint_saved_with_keys_refused_since_as_no_ops_still_resumes(tmp_path):
    """A checkpoint written before `moe.cosine_router_scale` with linear logits was refused
    (it changes nothing there) is compared after the same upgrade that loads it elsewhere."""
    linear = replace(MOE, router_logits="linear")
    step = _weights_only_dir(tmp_path, MODEL, MOE)
    config = yaml.safe_load((step / "config.yaml").read_text())
    config["moe"].update(router_logits="linear", cosine_router_scale=5.0)
    (step / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _check_same_architecture(step, MODEL.build(linear))


def test_the_allow_list_names_real_fields_and_everything_else_is_compared():
    import dataclasses

    from mm_moe.checkpoint.same_function import NOT_FUNCTION, function_fields

    def keys(cfg, prefix):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{prefix}.{f.name}")
            else:
                yield f"{prefix}.{f.name}"

    model = replace(MODEL, mod=replace(MODEL.mod, layers=[1]))
    every = {*keys(model, "model"), *keys(MOE, "moe")}
    assert every >= NOT_FUNCTION  # no typo silently compares a field
    compared = {*function_fields(model, "model"), *function_fields(MOE, "moe")}
    assert compared == (every - NOT_FUNCTION) | {"model.ffn_dim"}


def test_weights_only_load_names_every_differing_key(tmp_path):
    step = _weights_only_dir(tmp_path, MODEL, MOE)
    other = replace(MODEL, rope_theta=1e6, norm_eps=1e-6)
    with pytest.raises(UserError, match=r"model\.norm_eps.*model\.rope_theta.*moe\.top_k"):
        _check_same_architecture(step, other.build(replace(MOE, top_k=2)))


# ---- token shards: the tokenizer they were made with, by content ----
@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Two sentencepiece tokenizers of the same size and layout but other merges."""
    from pydoc_data.topics import topics

    from mm_moe.tokenization.sentencepiece_text import train_sentencepiece

    root = tmp_path_factory.mktemp("toks")
    texts = [topics[k] for k in sorted(topics)]
    for name, first in (("a", 0), ("b", 60)):
        train_sentencepiece(texts[first : first + 60], root / name, vocab_size=600)
    return root / "a", root / "b"


def _shards_made_with(folder, tokenizer) -> list[str]:
    from mm_moe.data.shards import TOKENIZER_RECORD, tokenizer_record

    folder.mkdir()
    tokenizer.build().vocab.save(folder / "vocab.yaml")
    record = tokenizer_record(tokenizer)  # as pretokenize writes it
    (folder / TOKENIZER_RECORD).write_text(yaml.safe_dump(record, sort_keys=False))
    return [str(folder / "tokens-000000.tar")]


def test_token_shards_accept_a_moved_tokenizer_and_refuse_a_changed_one(
    tmp_path, two_tokenizers, caplog
):
    import shutil

    from mm_moe.data.shards import TOKENIZER_RECORD, check_tokens_vocab
    from mm_moe.tokenization.config import TokenizerConfig
    from mm_moe.tokenization.digest import tokenizer_digest

    a, b = two_tokenizers
    made_with = TokenizerConfig(text="sentencepiece", path=str(a))
    shards = _shards_made_with(tmp_path / "shards", made_with)
    vocab = made_with.build().vocab
    moved = TokenizerConfig(text="sentencepiece", path=str(shutil.copytree(a, tmp_path / "m")))
    check_tokens_vocab(shards, moved, vocab, "data.sources[0]")  # same files elsewhere: fine

    shutil.copy(b / "text.model", tmp_path / "m" / "text.model")  # rebuilt in place
    assert moved.build().vocab == vocab  # same layout: only the digest tells them apart
    with pytest.raises(UserError) as err:
        check_tokens_vocab(shards, moved, vocab, "data.sources[0]")
    message = str(err.value)
    assert tokenizer_digest(made_with) in message and tokenizer_digest(moved) in message
    assert message.startswith("data.sources[0]: the token shards in") and "allow_changed" in message
    allowed = TokenizerConfig(text="sentencepiece", path=moved.path, allow_changed=True)
    with caplog.at_level("WARNING"):
        check_tokens_vocab(shards, allowed, vocab, "data.sources[0]")
    assert "going on: tokenizer.allow_changed=true" in caplog.text

    # shards from before digests (the plain config, path included): still read, and said so
    record = tmp_path / "shards" / TOKENIZER_RECORD
    old = {k: v for k, v in yaml.safe_load(record.read_text()).items() if k != "digest"}
    record.write_text(yaml.safe_dump({**old, "path": "tokenizers/elsewhere"}))
    with caplog.at_level("INFO"):
        check_tokens_vocab(shards, moved, vocab, "data.sources[0]")
    assert "records no tokenizer digest" in caplog.text
    # other settings are still refused
    record.write_text(yaml.safe_dump({**old, "text": "hf"}))
    with pytest.raises(UserError, match="is not the run's tokenizer config"):
        check_tokens_vocab(shards, moved, vocab, "data.sources[0]")

    # shards copied without the files beside them (or read from a remote store): read, and
    # said to be unchecked, naming the folder and what is missing
    caplog.clear()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokens-000000.tar").touch()  # only the folder's side files are read here
    with caplog.at_level("WARNING"):
        check_tokens_vocab([str(bare / "tokens-000000.tar")], moved, vocab, "data.sources[0]")
        check_tokens_vocab(["pipe:cat x/tokens-0.tar"], moved, vocab, "data.sources[1]")
    assert f"the tokens shards in {bare} have no vocab.yaml or {TOKENIZER_RECORD}" in caplog.text
    assert "data.sources[1]: tokens shards read from pipe:cat x/tokens-0.tar are not checked" in (
        caplog.text
    )


def test_a_full_resume_refuses_a_config_that_changes_the_function(tmp_path):
    """checkpoint.resume of a whole run checks the same keys before anything is read: a
    resumed run with another moe.score would train another function without a word."""
    import json
    from types import SimpleNamespace

    from mm_moe.checkpoint import state

    step = _weights_only_dir(tmp_path, MODEL, MOE)
    meta = {"format_version": 2, "step": 3, "world_size": 1, "scheduler": {}, "data": {}}
    (step / "meta.json").write_text(json.dumps(meta))
    engine = SimpleNamespace(module=MODEL.build(replace(MOE, score="softmax")), lr_scheduler=None)
    with pytest.raises(UserError, match="moe.score: checkpoint 'sigmoid', this run 'softmax'"):
        state.load(step, engine, loader=None, rank=0, world_size=1)
    # training-only changes pass the check (and reach the tensors, absent here)
    engine.module = MODEL.build(replace(MOE, router_noise=0.5))
    with pytest.raises(Exception) as err:
        state.load(step, engine, loader=None, rank=0, world_size=1)
    assert "differs from this run's" not in str(err.value)
    # a config.yaml cut short parses into values nobody saved: named, not the bare key
    (step / "config.yaml").write_text("model:\n  document_masking:\n")
    with pytest.raises(UserError, match=r"config.yaml is damaged \(model.document_masking=None"):
        state.load(step, engine, loader=None, rank=0, world_size=1)


def test_dense_weights_into_an_moe_run_point_at_the_upcycle(tmp_path):
    """checkpoint.resume (or weights_only) from a dense checkpoint into an MoE run: the keys
    differ, and what the user needs is mm_moe.upcycle, which the message names."""
    step = _weights_only_dir(tmp_path, MODEL, MoEConfig())
    with pytest.raises(
        UserError, match=r"A dense checkpoint becomes an MoE one with .*mm_moe"
    ) as e:
        _check_same_architecture(step, MODEL.build(MOE))
    # the switch alone, not every MoE field the dense side lacks ("checkpoint None")
    assert "moe.experts_per_modality: checkpoint {}" in str(e.value)
    assert "checkpoint None" not in str(e.value)


def test_a_key_one_side_does_not_use_is_shown_as_not_used():
    """moe.top_k is left out under expert choice: it showed as `this run None`."""
    from mm_moe.checkpoint.same_function import differences

    said = differences({"moe.router": "token_choice", "moe.top_k": 1}, {"moe.router": "x"})
    assert "moe.top_k: checkpoint 1, this run (not used)" in said
