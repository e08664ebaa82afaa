"""Hugging Face import and upcycling, against a tiny transformers Llama built here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from mm_moe import load_pretrained
from mm_moe.config import ConfigError
from mm_moe.upcycle import hf_import
from mm_moe.upcycle.ops import upcycle_experts
from mm_moe.upcycle_command import run
from tests import hf_fixtures as tiny_hf

HF_VOCAB = 300
# The synthetic data with the Hugging Face model's text ids: specials and image codes after.
DATA_VOCAB = [f"data.synthetic.text_vocab_size={HF_VOCAB}"]
TC_TOP2 = [
    "moe.experts_per_modality.text=4",
    "moe.experts_per_modality.image=4",
    "moe.router=token_choice",
    "moe.top_k=2",
]


def make_hf_llama(path, tie=False, shard=None, seed=0, **overrides):
    """The tiny Llama of scripts/tiny_hf_model.py at HF_VOCAB, with Llama's own special ids."""
    return tiny_hf.make_hf_llama(
        path, HF_VOCAB, seed, tokenizer=False, tie=tie, shard=shard, **overrides
    )


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    return path, make_hf_llama(path)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, HF_VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ours(path, ids):
    model = load_pretrained(path)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        return model, model(ids).logits  # modality_ids=None: all text


def _old_style_config(path, theta):
    """Rewrite config.json the way transformers < 5 wrote it (rope_theta + rope_scaling)."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=theta, rope_scaling=None)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "variant", ["single", "sharded", "tied", "rope_theta_style", "linear_factor_1"]
)
def test_dense_import_equals_transformers(tmp_path, ids, variant):
    src = tmp_path / "hf"
    if variant == "linear_factor_1":  # scaling that changes nothing is unscaled RoPE
        ref = make_hf_llama(src, rope_parameters={"rope_type": "linear", "factor": 1.0})
    elif variant == "rope_theta_style":
        ref = make_hf_llama(src, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
        _old_style_config(src, 5e5)
    else:
        ref = make_hf_llama(
            src, tie=variant == "tied", shard="40KB" if variant == "sharded" else None
        )
    if variant == "sharded":
        assert (src / hf_import.INDEX).is_file() and not (src / hf_import.SINGLE).exists()
    cfg, model = hf_import.import_dense(src)
    assert cfg.tie_embeddings == (variant == "tied")
    assert cfg.rope_theta == (5e5 if variant == "rope_theta_style" else 1e4)
    expected = _hf_logits(ref, ids)
    with torch.no_grad():
        got = model(ids).logits
    assert (got - expected).abs().max() <= 1e-5
    assert expected.abs().max() > 1  # the comparison is not between near-zero numbers

    # The same through the command: a dense checkpoint of this project, vocabulary extended.
    out = tmp_path / "dense"
    assert run([f"source={src}", "source_format=hf", f"out={out}", *DATA_VOCAB]) == 0
    loaded, logits = _ours(out, ids)
    # Llama's own bos (1) and eos (2) kept; pad, boi, eoi and the image codes appended
    assert loaded.cfg.vocab_size == HF_VOCAB + 3 + 64
    assert (logits[..., :HF_VOCAB] - expected).abs().max() <= 1e-5
    # Text ids keep their rows; new rows start near the mean row.
    emb = ref.model.embed_tokens.weight
    assert torch.equal(loaded.embed.weight[:HF_VOCAB], emb)
    new = loaded.embed.weight[HF_VOCAB:]
    assert (new.mean(0) - emb.mean(0)).abs().max() < 0.1 * emb.std(0).max()
    assert (loaded.lm_head.weight is loaded.embed.weight) == (variant == "tied")


@pytest.mark.parametrize(
    "variant",
    [
        [*TC_TOP2, "untie=[attention,norms]"],  # sparse upcycling + MoT copies
        [*TC_TOP2, "moe.granularity=2", "moe.score=softmax"],  # granular, virtual groups
        [
            "moe.experts_per_modality.mixed=4",
            "moe.router=token_choice",
            "moe.top_k=1",
            "moe.granularity=4",
            "moe.shared_experts=1",
            "model.untie=[norms]",
        ],
        ["untie=[attention,norms,ffn]"],  # MoT without MoE
    ],
    ids=["sparse_mot", "granular", "granular_shared_mixed", "mot_dense"],
)
def test_upcycled_logits_equal_source(tmp_path, hf, ids, variant, capsys):
    src, ref = hf
    out = tmp_path / "up"
    code = run(
        [f"source={src}", "source_format=hf", f"out={out}", "verify=true", *DATA_VOCAB, *variant]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "verify: function preserved" in printed and "transformers LlamaForCausalLM" in printed
    _, logits = _ours(out, ids)
    assert (logits[..., :HF_VOCAB] - _hf_logits(ref, ids)).abs().max() <= 1e-5
    meta = json.loads((out / "meta.json").read_text())
    assert meta["weights_only"] and meta["step"] == 0


def test_native_source_upcycles_exactly(tmp_path, hf, ids, capsys):
    src, ref = hf
    dense = tmp_path / "dense"
    assert run([f"source={src}", "source_format=hf", f"out={dense}", *DATA_VOCAB]) == 0
    out = tmp_path / "moe"
    # A tokenizer change synthetic data cannot see would be stored with the source's vocabulary.
    with pytest.raises(ConfigError, match=r"tokenizer.levels=8 \(the source's \d+\).*data.sources"):
        run([f"source={dense}", f"out={out}", *TC_TOP2, "tokenizer.levels=8"])
    with pytest.raises(ConfigError, match=r"tokenizer.text=sentencepiece \(the source's"):
        run([f"source={dense}", f"out={out}", *TC_TOP2, "tokenizer=demo"])  # a group choice
    assert not out.exists()
    code = run([f"source={dense}", f"out={out}", "verify=true", *TC_TOP2, "untie=[attention]"])
    printed = capsys.readouterr().out
    assert code == 0 and "function preserved" in printed and "native dense source" in printed
    model, logits = _ours(out, ids)
    assert model.moe_cfg.experts_per_modality == {"text": 4, "image": 4}
    assert (logits[..., :HF_VOCAB] - _hf_logits(ref, ids)).abs().max() <= 1e-5


def test_expert_choice_verify_reports_why(tmp_path, hf, capsys, caplog):
    caplog.set_level("INFO")
    src, _ = hf
    out = tmp_path / "ec"
    code = run(
        [
            f"source={src}",
            "source_format=hf",
            f"out={out}",
            "verify=true",
            "moe=moma_4t4i_ec",
            *DATA_VOCAB,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    said = "mm_moe.export cannot write it back: experts grouped by modality (MoMa)"
    assert said in caplog.text  # before training, not after it
    # a logit difference proves nothing here: never reported as passed
    assert "verify: not checked" in printed and "function preserved" not in printed
    assert "moe.router=expert_choice" in printed and "tokens processed by no expert" in printed
    diff = float(printed.split("max |logit difference| = ")[1].split()[0])
    assert diff > 1e-5


def test_unprocessed_tokens_are_listed_for_every_group_the_input_fed():
    """Image groups are listed where verify's input held images (a native or Chameleon
    source), left out for a text-only one."""
    from mm_moe.upcycle.verify import _unprocessed

    stats = {
        "moe/l0/text/dropped": torch.tensor(0.0),
        "moe/l0/image/dropped": torch.tensor(0.25),
        "moe/l0/image/pairs": torch.tensor(3.0),
        "moe/l2/text/dropped": torch.tensor(0.5),
    }
    assert _unprocessed(stats, images=True) == "l0/text 0.00, l0/image 0.25, l2/text 0.50"
    assert _unprocessed(stats, images=False) == "l0/text 0.00, l2/text 0.50"


@pytest.mark.parametrize("granularity", [1, 2])
def test_drop_upcycling_changes_exact_fraction_per_expert(granularity):
    gen = torch.Generator().manual_seed(0)
    f, d, copies, r = 96, 32, 4, 0.5
    w_gate, w_up, w_down = (torch.randn(f, d), torch.randn(f, d), torch.randn(d, f))
    gu, down = upcycle_experts(w_gate, w_up, w_down, copies, granularity, gen, drop_ratio=r)
    h, scale = f // granularity, math.sqrt(granularity)
    assert gu.shape == (copies * granularity, d, 2 * h) and down.shape == (
        copies * granularity,
        h,
        d,
    )
    changed = []
    for e in range(copies * granularity):
        shard = slice((e % granularity) * h, (e % granularity + 1) * h)
        same_gate = (gu[e, :, :h].t() == w_gate[shard]).all(1)
        same_up = (gu[e, :, h:].t() == w_up[shard] * scale).all(1)
        same_down = (down[e] == w_down[:, shard].t() * scale).all(1)
        kept = same_gate & same_up & same_down
        # A hidden unit is either kept whole (gate row, up row, down column) or redrawn whole.
        assert torch.equal(kept, same_gate) and torch.equal(kept, same_down)
        assert int((~kept).sum()) == math.ceil(r * h)
        changed.append(frozenset((~kept).nonzero().flatten().tolist()))
    assert len(set(changed)) == len(changed)  # a different subset in every expert
    # Redrawn values follow the source matrix's statistics.
    redrawn = torch.cat([gu[e, :, :h].t()[list(changed[e])] for e in range(len(changed))])
    assert abs(redrawn.std().item() - w_gate.std().item()) < 0.1


def test_drop_ratio_through_the_command(tmp_path, hf):
    src, _ = hf
    out = tmp_path / "drop"
    args = [f"source={src}", "source_format=hf", f"out={out}", "drop_ratio=0.5", *DATA_VOCAB]
    assert run([*args, *TC_TOP2]) == 0
    state = torch.load(out / "model.pt", weights_only=True)
    w_gate = hf[1].model.layers[0].mlp.gate_proj.weight.detach()
    for group in ("text", "image"):
        for i in range(4):
            gu = state[f"layers.0.ffn.experts.{group}.{i}.w_gate_up"]
            kept = (gu[:, :128].t() == w_gate).all(1)
            assert int((~kept).sum()) == 64


def test_a_crash_while_replacing_leaves_a_whole_checkpoint(tmp_path, hf, monkeypatch):
    """overwrite=true over an earlier upcycle, killed while the old folder is deleted: `out`
    still holds a complete checkpoint (the new one), never a half-deleted old one."""
    import shutil

    src, _ = hf
    out = tmp_path / "out"
    base = [f"source={src}", "source_format=hf", f"out={out}", *DATA_VOCAB]
    assert run(base) == 0
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if not files:
            return real_rmtree(path, *args, **kwargs)
        files[-1].unlink()  # the first file gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        run([*base, "overwrite=true", "drop_ratio=0.5"])
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["upcycled_from"]["drop_ratio"] == 0.5  # the new one, whole
    load_pretrained(out)


def test_bad_input_is_named(tmp_path, hf):
    src, _ = hf
    base = [f"source={src}", "source_format=hf", *DATA_VOCAB]
    out = tmp_path / "x"
    with pytest.raises(ValueError, match="model.d_model"):
        run([*base, f"out={out}", "model.d_model=128"])
    with pytest.raises(ConfigError, match="drop_ratio"):
        run([*base, f"out={out}", "drop_rato=0.5"])
    with pytest.raises(ConfigError, match="top_kk"):
        run([*base, f"out={out}", "moe.top_kk=2"])
    for key in ("router_init_std=nan", "expert_noise=inf", "new_rows_noise=nan"):
        with pytest.raises(ConfigError, match=f"{key}.* must be a finite number >= 0"):
            run([*base, f"out={out}", key])
    assert not out.exists()  # nothing written
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ValueError, match="overwrite=true"):
        run([*base, f"out={out}"])
    assert run([*base, f"out={out}", "overwrite=true"]) == 0 and not (out / "keep").exists()

    for i, (change, match) in enumerate(
        [
            (
                {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
                "llama3",
            ),
            (
                {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
                "linear",
            ),
            ({"attention_bias": True}, "attention_bias"),
            ({"model_type": "gpt2"}, "model_type"),
        ]
    ):
        bad = tmp_path / f"bad_{i}"
        bad.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=f"config.json.*{match}"):
            hf_import.model_fields(json.loads((bad / "config.json").read_text()), bad)

    # a tokenizer with ids beyond the embedding: they would become the appended image ids
    with_tok = tmp_path / "with_tokenizer"
    with_tok.mkdir()
    size = tiny_hf.make_tokenizer(with_tok, 300, image_tokens=False).get_vocab_size(True)
    hf_cfg = {**json.loads((src / "config.json").read_text()), "vocab_size": size - 2}
    with pytest.raises(ValueError, match=rf"tokenizer has {size} ids .*vocab_size is {size - 2}"):
        hf_import.source_layout(with_tok, hf_cfg, 64)
    hf_import.source_layout(with_tok, {**hf_cfg, "vocab_size": size}, 64)  # the same: fine
    # a pickled checkpoint is named with the way to convert it; a short context names the key
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds pytorch_model.bin: convert it .*save_pretrained"):
        hf_import.load_tensors(pickled)
    short = tmp_path / "short"
    short.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 32}))
    (short / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"source's max_position_embeddings=32 .*data.seq_len=32"):
        run([f"source={short}", "source_format=hf", *DATA_VOCAB, f"out={tmp_path / 's'}"])


@pytest.mark.parametrize(
    "arg, group",
    [
        ("trainer.max_steps=5", "trainer"),
        ("optim.lr=1e-3", "optim"),
        ("parallel.zero_stage=2", "parallel"),
        ("name=mine", "name"),
        ("optim=adamw", "optim"),  # a group choice
    ],
)
def test_training_keys_the_upcycle_does_not_use_are_refused(tmp_path, arg, group):
    from mm_moe.upcycle_command import split_args

    base = ["source=x", f"out={tmp_path / 'out'}"]
    says = rf"'{re.escape(arg)}': the upcycle does not use '{group}'"
    with pytest.raises(ConfigError, match=says):
        split_args([*base, arg])
    options, choices, train = split_args([*base, "moe=moma_4t4i_tc", "data.seq_len=64"])
    assert choices == ["moe=moma_4t4i_tc"] and train == [("data.seq_len", 64)]


def test_a_mixture_of_depths_source_is_refused_as_such(tmp_path):
    from tests.unit.test_export import _checkpoint

    source = _checkpoint(tmp_path / "mod", {}, {"mod": {"layers": [1]}})
    with pytest.raises(ValueError) as err:
        run([f"source={source}", f"out={tmp_path / 'out'}", "moe=moma_4t4i_tc"])
    message = str(err.value)
    assert "mixture-of-depths" in message and "model.mod.layers=[1]" in message
    assert "neither dense" not in message and not (tmp_path / "out").exists()


def test_untie_ffn_on_a_mixed_target_says_what_is_true_for_it(tmp_path):
    from tests.unit.test_export import _checkpoint

    source = _checkpoint(tmp_path / "dense", {})
    with pytest.raises(ConfigError) as err:
        run([f"source={source}", f"out={tmp_path / 'out'}", "moe=mixed8_ec", "untie=[ffn]"])
    message = str(err.value)
    assert "one 'mixed' expert group" in message and "MoMa groups already" not in message


def test_resume_names_architecture_differences(tmp_path, hf):
    from mm_moe.checkpoint.state import _check_same_architecture
    from mm_moe.model.config import ModelConfig

    src, _ = hf
    out = tmp_path / "up"
    assert run([f"source={src}", "source_format=hf", f"out={out}", *DATA_VOCAB, *TC_TOP2]) == 0
    _check_same_architecture(out, load_pretrained(out))  # the checkpoint's own model: fine
    other = ModelConfig(vocab_size=369, d_model=128, n_layers=2).build()
    with pytest.raises(ValueError, match=r"model\.d_model.*experiment=upcycled"):
        _check_same_architecture(out, other)


def test_router_virtual_groups_and_expert_noise():
    from mm_moe.upcycle.ops import virtual_group_router

    gen = torch.Generator().manual_seed(0)
    router = virtual_group_router(copies=3, granularity=2, d=8, std=0.02, gen=gen)
    assert torch.equal(router[0], router[1]) and not torch.equal(router[1], router[2])
    assert 0.01 < router.std().item() < 0.03
    w = (torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16))
    exact, _ = upcycle_experts(*w, 2, 1, gen)
    assert torch.equal(exact[0], exact[1])
    noisy, _ = upcycle_experts(*w, 2, 1, gen, noise=0.01)
    assert not torch.equal(noisy[0], noisy[1])
    assert (noisy[0] - exact[0]).abs().max() < 0.1


def test_an_orthogonal_router_init_is_what_the_upcycle_writes(tmp_path, hf, ids, capsys):
    """moe.router_init=orthogonal was recorded in the upcycled config while its routers got
    the normal rows: now each group's rows are orthogonal, with a normal row's norm, and the
    function is still preserved."""
    src, ref = hf
    out = tmp_path / "up"
    args = [f"source={src}", "source_format=hf", f"out={out}", "verify=true", *DATA_VOCAB]
    assert run([*args, *TC_TOP2, "moe.router_init=orthogonal"]) == 0
    assert "verify: function preserved" in capsys.readouterr().out
    model, _ = _ours(out, ids)
    for router in model.layers[0].ffn.routers.values():
        w = router.weight.double()
        gram = w @ w.T
        norm = 0.02 * w.shape[1] ** 0.5  # the upcycle's router_init_std
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-6 and torch.allclose(
            w.norm(dim=1), torch.full((w.shape[0],), norm, dtype=w.dtype)
        )


def test_verify_says_when_training_starts_from_another_function(tmp_path, hf, capsys):
    """Token choice with a capacity drops tokens in training only: the eval-mode logits the
    upcycle compares are the source's, the first training step's are not. Said, not left
    to be found in the first loss."""
    src, _ = hf
    args = [f"source={src}", "source_format=hf", "verify=true", *DATA_VOCAB, *TC_TOP2]
    assert run([*args, f"out={tmp_path / 'cap'}", "moe.capacity_factor=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "function preserved (eval-mode logits over the source's ids); what" in printed
    assert "moe.capacity_factor=0.5: in training" in printed
    assert "the vocabulary grows by 67 ids (300 -> 367)" in printed  # the image rows are new
    assert run([*args, f"out={tmp_path / 'dropless'}"]) == 0
    assert "moe.capacity_factor" not in capsys.readouterr().out


def test_the_upcycle_takes_deletions_as_training_does(tmp_path, hf):
    """The groups' dict merges preset and overrides; the advice names `~key` deletions, which
    the upcycle refused ("only key=value overrides")."""
    src, _ = hf
    args = [f"source={src}", "source_format=hf", *DATA_VOCAB, *TC_TOP2]
    mixed = "moe.experts_per_modality.mixed=4"
    with pytest.raises(ConfigError, match=r"delete the modality groups .*~moe"):
        run([*args, f"out={tmp_path / 'a'}", mixed])
    drop = ["~moe.experts_per_modality.text", "~moe.experts_per_modality.image"]
    assert run([*args, f"out={tmp_path / 'b'}", mixed, *drop]) == 0
    model, _ = _ours(tmp_path / "b", torch.zeros(1, 4, dtype=torch.long))
    assert model.moe_cfg.experts_per_modality == {"mixed": 4}
    with pytest.raises(ConfigError, match=r"has no moe.experts_per_modality.audio to delete"):
        run([*args, f"out={tmp_path / 'c'}", "~moe.experts_per_modality.audio"])
    with pytest.raises(ConfigError, match=r"has no moe.top_k.x to delete"):  # a scalar parent
        run([*args, f"out={tmp_path / 'c'}", "~moe.top_k.x"])
    with pytest.raises(ConfigError, match=r"a deletion takes the key alone"):
        run([*args, f"out={tmp_path / 'c'}", "~moe.top_k=2"])
    with pytest.raises(ConfigError, match=r"takes Hydra's --config-dir only \(not config_name"):
        run([*args, f"out={tmp_path / 'c'}", "--config-name", "x"])


def test_the_upcycle_reads_the_users_own_presets_from_config_dir(tmp_path, hf, ids, capsys):
    """`--config-dir DIR moe=mine`, as training takes it (a Hydra lexer error before)."""
    src, ref = hf
    (tmp_path / "cfg" / "moe").mkdir(parents=True)
    (tmp_path / "cfg" / "moe" / "mine.yaml").write_text(
        "experts_per_modality: {text: 3, image: 5}\nrouter: token_choice\nscore: softmax\n"
        "top_k: 2\nrenormalize: true\n"
    )
    out = tmp_path / "up"
    args = [f"source={src}", "source_format=hf", f"out={out}", "verify=true", *DATA_VOCAB]
    assert run([*args, "moe=mine", "--config-dir", str(tmp_path / "cfg")]) == 0
    assert "verify: function preserved" in capsys.readouterr().out
    model, logits = _ours(out, ids)
    assert model.moe_cfg.experts_per_modality == {"text": 3, "image": 5}
    assert (logits[..., :HF_VOCAB] - _hf_logits(ref, ids)).abs().max() <= 1e-5


def test_a_source_without_a_tokenizer_trains_only_on_its_ids(tmp_path, hf):
    """No tokenizer files: any stand-in would map text onto the source's unrelated ids, so the
    overlay says tokenizer.text=none and raw-text shards are refused, tokens shards read."""
    import yaml

    from mm_moe.cli import compose
    from mm_moe.errors import UserError

    src, _ = hf
    out = tmp_path / "up"
    assert run([f"source={src}", "source_format=hf", f"out={out}", *DATA_VOCAB, *TC_TOP2]) == 0
    overlay = yaml.safe_load((out / "experiment" / "upcycled.yaml").read_text())
    assert overlay["tokenizer"]["text"] == "none"

    def train_on(fmt, key="data.sources"):
        data = [] if key == "eval.sources" else ["data=webdataset"]
        return compose(
            ["experiment=upcycled", *data, f"{key}=[{{urls: {tmp_path}/x.tar, format: {fmt}}}]"],
            config_dir=str(out),
        )

    for fmt, key in (("text", "data.sources"), ("pairs", "data.sources"), ("text", "eval.sources")):
        said = rf"{re.escape(key)}\[0\].format={fmt}: tokenizer.text=none"
        with pytest.raises(UserError, match=said):
            train_on(fmt, key)
    cfg = train_on("tokens")
    tokenizers = cfg.tokenizer.build()
    assert tokenizers.vocab.size == load_pretrained(out).embed.weight.shape[0]
    with pytest.raises(UserError, match="tokenizer.text=none: this model has no text tokenizer"):
        tokenizers.text.encode("hello")
    assert tokenizers.text.decode([5, 17]) == "<5><17>"


@pytest.mark.parametrize("with_file", [True, False], ids=["generation_config", "config_only"])
def test_an_eos_list_survives_upcycle_and_export(tmp_path, with_file):
    """Llama 3 stops at any of several eos ids: the vocabulary keeps one (documents end with
    it), the export writes the source's whole list back in generation_config.json."""
    import transformers

    from mm_moe.export import ExportConfig
    from mm_moe.export import run as export

    src = tmp_path / "src"
    make_hf_llama(src, eos_token_id=[2, 7])
    if not with_file:  # what transformers derives from config.json, written by the upcycle
        (src / "generation_config.json").unlink()
    out, hf_out = tmp_path / "up", tmp_path / "hf"
    assert run([f"source={src}", "source_format=hf", f"out={out}", *DATA_VOCAB]) == 0
    assert export(ExportConfig(str(out), str(hf_out))) == "llama"
    assert transformers.GenerationConfig.from_pretrained(hf_out).eos_token_id == [2, 7]
    assert json.loads((hf_out / "config.json").read_text())["eos_token_id"] == 2


def test_a_mistral_window_no_sequence_reaches_imports_exactly(tmp_path, ids):
    def mistral(window):  # max_position_embeddings=256
        path = tmp_path / f"w{window}"
        return path, make_hf_llama(path, family="Mistral", sliding_window=window)

    src, ref = mistral(256)
    _, model = hf_import.import_dense(src)
    with torch.no_grad():
        assert (model(ids).logits - _hf_logits(ref, ids)).abs().max() <= 1e-5
    src, _ = mistral(128)
    with pytest.raises(ValueError, match="sliding_window=128 is not supported"):
        hf_import.import_dense(src)


def test_a_moved_upcycle_reads_its_own_vocabulary_copy(tmp_path, hf, caplog):
    """The config records tokenizer.vocab as the upcycle's OUT/vocab.yaml: once that folder
    moved (or a fine-tune of it outlived it), loading failed with FileNotFoundError. The step
    folder's own copy is read instead, and the tokenizer is still checked by its digest."""
    import shutil

    import mm_moe

    src, _ = hf
    out = tmp_path / "up"
    assert run([f"source={src}", "source_format=hf", f"out={out}", *DATA_VOCAB]) == 0
    want = mm_moe.load_tokenizers(out).vocab
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    caplog.set_level("INFO")
    assert mm_moe.load_tokenizers(moved).vocab == want
    assert mm_moe.load_pretrained(moved).cfg.vocab_size == want.size
    assert f"reading the layout from {moved / 'vocab.yaml'}" in caplog.text
    assert "not compared" not in caplog.text  # the digest matched
