"""Starting from published models: Hugging Face tokenizers, the vocabulary the import lays out,
Chameleon (the LM and its VQGAN), MoMa's own upcycling recipe, and export back to Hugging Face.
Every model here is a tiny one that transformers builds and saves in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml

import mm_moe
from mm_moe.upcycle_command import run as upcycle
from tests.hf_fixtures import _texts, make_hf_chameleon, make_hf_llama

MOMA_TC = ["moe=moma_4t4i_tc"]


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    path = tmp_path_factory.mktemp("chameleon")
    return path, make_hf_chameleon(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, make_hf_llama(path)


def _mixed_ids(vocab, seed=0, length=40):
    """A text, an image (boi, codes, eoi), text again: [1, length]."""
    g = torch.Generator().manual_seed(seed)
    specials = [vocab.bos, vocab.eos, vocab.pad, vocab.boi, vocab.eoi]
    text = np.flatnonzero(~vocab.is_image(np.arange(vocab.size)) & (np.arange(vocab.size) < 300))
    text = torch.from_numpy(text[~np.isin(text, specials)])
    words = text[torch.randint(0, len(text), (length - 20,), generator=g)]
    codes = vocab.image_token_ids(torch.randint(0, vocab.image_size, (16,), generator=g))
    ids = [vocab.bos, *words[:10].tolist(), vocab.boi, *codes.tolist(), vocab.eoi]
    return torch.tensor([ids + words[10:].tolist() + [vocab.eos]])


def _text_columns_max_diff(ours, theirs, vocab):
    """transformers' Chameleon gives image-token logits no value: compare the others."""
    keep = ~vocab.image_id_mask()[: theirs.shape[-1]]
    return (ours[..., : theirs.shape[-1]][..., keep] - theirs[..., keep]).abs().max().item()


# ---- Hugging Face text tokenizers ----
def test_hf_text_tokenizer_round_trips_and_knows_its_specials(llama, tmp_path):
    from mm_moe.tokenization.config import TokenizerConfig
    from mm_moe.tokenization.sentencepiece_text import train_sentencepiece

    path, _ = llama
    toks = TokenizerConfig(text="hf", path=str(path)).build()
    for text in _texts()[:20] + ["Zürich – naïve café, 100% ✓\n\ttabs"]:
        ids = toks.text_ids(text)
        assert toks.text.decode(ids) == text  # byte-level BPE round-trips exactly
        assert max(ids) < toks.text.vocab_size
    vocab = toks.vocab  # the tokenizer's own bos/eos/pad; boi, eoi and the codes appended
    assert (vocab.bos, vocab.pad, vocab.eos) == (0, 1, 2)
    assert (vocab.boi, vocab.eoi, vocab.image_offset) == (300, 301, 302)
    # tokenizer.model (sentencepiece) folders load too
    sp = tmp_path / "sp"
    model = train_sentencepiece(iter(_texts()), sp, 400, "bpe")
    model.rename(sp / "tokenizer.model")
    sp_toks = TokenizerConfig(text="hf", path=str(sp)).build()
    text = "The quick brown fox jumps over the lazy dog."
    assert sp_toks.text.decode(sp_toks.text_ids(text)) == text


# ---- Llama: the vocabulary laid out by the import, the tokenizer copied ----
def test_llama_import_needs_no_vocabulary_keys_and_trains_with_its_tokenizer(llama, tmp_path):
    path, ref = llama
    out = tmp_path / "up"
    assert upcycle([f"source={path}", "source_format=hf", f"out={out}", *MOMA_TC]) == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    cfg = yaml.safe_load((out / "experiment" / "upcycled.yaml").read_text())
    assert cfg["tokenizer"]["text"] == "hf" and cfg["tokenizer"]["vocab"] == str(out / "vocab.yaml")
    toks = mm_moe.load_tokenizers(out)
    assert toks.vocab.bos == 0 and toks.vocab.image_offset == 302
    from tokenizers import Tokenizer

    source = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "Return a new dictionary."
    assert toks.text_ids(text) == source.encode(text, add_special_tokens=False).ids
    # the upcycled model reads modality ids from that vocabulary: text ids are text
    model = mm_moe.load_pretrained(out)
    assert not model.image_id_mask_V[torch.tensor(toks.text_ids(text))].any()
    assert model.image_id_mask_V[302 : 302 + toks.vocab.image_size].all()


def test_llama_import_takes_a_trained_vq_beside_its_tokenizer(llama, demo_assets, tmp_path):
    from PIL import Image

    (path, ref), (vq_dir, _) = llama, demo_assets
    out = tmp_path / "up"
    args = [f"source={path}", "source_format=hf", f"out={out}"]
    assert upcycle([*args, "tokenizer.image=vq", f"tokenizer.path={vq_dir}"]) == 0
    assert (out / "tokenizer" / "vq.pt").is_file() and (
        out / "tokenizer" / "tokenizer.json"
    ).is_file()
    toks = mm_moe.load_tokenizers(out)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), np.uint8))
    ids = toks.image_token_ids(image)
    assert len(ids) == toks.image.tokens_per_image and toks.vocab.is_image(ids).all()
    assert ids.min() >= ref.config.vocab_size  # after the source's text ids
    assert np.array_equal(ids, toks.vocab.image_token_ids(toks.image.encode(image)))


# ---- Chameleon ----
@pytest.mark.parametrize("swin_norm", [False, True])
def test_chameleon_import_gives_transformers_logits_on_text_and_images(tmp_path, swin_norm):
    from mm_moe.upcycle import hf_import

    path = tmp_path / "chameleon"
    ref = make_hf_chameleon(path, seed=1, swin_norm=swin_norm)
    out = tmp_path / "dense"
    assert upcycle([f"source={path}", "source_format=hf", f"out={out}"]) == 0
    model = mm_moe.load_pretrained(out)
    assert model.cfg.qk_norm == "head_layernorm"
    assert model.cfg.norm_placement == ("post" if swin_norm else "pre")
    vocab = model.vocab
    hf = hf_import.read_config(path)
    assert vocab.image_ids == hf_import.chameleon_image_ids(hf)  # shuffled, inside the vocab
    assert vocab.boi == hf["vocabulary_map"]["<racm3:break>"]
    ids = _mixed_ids(vocab)
    with torch.no_grad():
        ours = model(input_ids=ids).logits  # modality ids from the vocabulary
        explicit = model(ids, torch.from_numpy(vocab.modality_of(ids)).long()).logits
        theirs = ref(input_ids=ids).logits
    torch.testing.assert_close(ours, explicit, rtol=0, atol=0)
    assert _text_columns_max_diff(ours, theirs, vocab) <= 1e-5 * theirs.abs().max().item()


def test_chameleon_image_tokens_equal_transformers_on_real_photos(chameleon, tmp_path):
    from PIL import Image
    from skimage import data
    from transformers.models.chameleon.image_processing_pil_chameleon import (
        ChameleonImageProcessorPil,
    )

    path, ref = chameleon
    out = tmp_path / "dense"
    assert upcycle([f"source={path}", "source_format=hf", f"out={out}"]) == 0
    toks = mm_moe.load_tokenizers(out)  # the VQGAN as the import extracted it
    res = ref.config.vq_config.resolution
    processor = ChameleonImageProcessorPil(
        size={"shortest_edge": res}, crop_size={"height": res, "width": res}
    )
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        image = Image.fromarray(getattr(data, name)())
        ours = toks.image_token_ids(image)
        with torch.no_grad():
            theirs = ref.get_image_tokens(processor(image, return_tensors="pt")["pixel_values"])
        assert np.array_equal(ours, theirs.reshape(-1).numpy()), name
    with pytest.raises(ValueError, match="decoder weights were never published"):
        toks.image.decode(np.zeros(toks.image.tokens_per_image, dtype=np.int64))

    # Sampling an image keeps its codes, for a decoder elsewhere; a caption decodes as text.
    from mm_moe.generate import GenerateConfig
    from mm_moe.generate import run as generate

    model = mm_moe.load_pretrained(out)
    sample = generate(
        GenerateConfig(str(out), prompt="hi", mode="image", out=str(tmp_path)), model, toks
    )
    codes = np.load(sample[0]["images"][0])
    assert codes.shape == (toks.image.tokens_per_image,) and codes.max() < toks.image.codebook_size
    image_path = tmp_path / "photo.png"
    Image.fromarray(data.astronaut()).save(image_path)
    ask = GenerateConfig(str(out), image=str(image_path), mode="text", max_new_tokens=4)
    caption = generate(ask, model, toks)
    assert caption[0]["images"] == [] and isinstance(caption[0]["text"], str)


@pytest.mark.parametrize(
    "variant", [MOMA_TC, ["untie=[attention,norms]"]], ids=["moma_token_choice", "mot"]
)
def test_chameleon_upcycles_into_moma_and_mot_exactly(chameleon, tmp_path, variant, capsys):
    path, _ = chameleon
    out = tmp_path / "up"
    code = upcycle([f"source={path}", "source_format=hf", f"out={out}", "verify=true", *variant])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "ChameleonForConditionalGeneration" in printed and "text and image tokens" in printed
    assert "verify: function preserved" in printed


# ---- MoMa's recipe: one expert per modality -> N experts per modality ----
def _native(tmp_path: Path, moe: dict, untie: list[str], model: dict | None = None) -> Path:
    """A weights-only checkpoint of a tiny model with random (non-trivial) weights; `model`:
    more model keys."""
    from mm_moe.checkpoint import experts, layout
    from mm_moe.config import TrainConfig, from_dict, to_dict

    cfg = from_dict(
        TrainConfig,
        {
            "model": {
                **{"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "untie": untie},
                **(model or {}),
            },
            "moe": moe,
            "data": {"seq_len": 32},
        },
    )
    torch.manual_seed(0)
    vocab = cfg.data.vocab(cfg.tokenizer)
    model_cfg = cfg.model.with_vocab(vocab.size)
    model = model_cfg.build(cfg.moe)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at one: make them matter
                p.add_(0.3 * torch.randn_like(p))
    cfg_dict = to_dict(cfg)
    cfg_dict["model"]["vocab_size"] = model_cfg.vocab_size
    step = tmp_path / "source"
    step.mkdir()
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update({n: b for n, b in model.named_buffers() if n in model.state_dict()})
    torch.save(experts.split_experts(state, experts.expert_keys(model)), step / "model.pt")
    (step / "config.yaml").write_text(yaml.safe_dump(cfg_dict))
    vocab.save(step / "vocab.yaml")
    (step / layout.META).write_text(
        json.dumps({"format_version": 2, "step": 0, "weights_only": True})
    )
    return step


@pytest.mark.parametrize(
    "moe, untie",
    [
        ({"experts_per_modality": {"text": 1, "image": 1}, "router": "token_choice"}, []),
        ({}, ["ffn"]),
    ],
    ids=["one_expert_per_group", "dense_untied_ffn"],
)
def test_moma_recipe_copies_each_modalitys_ffn_exactly(tmp_path, moe, untie, capsys):
    source = _native(tmp_path, moe, untie)
    out = tmp_path / "up"
    args = [f"source={source}", f"out={out}", "verify=true", "untie=[]"]
    args += ["moe.experts_per_modality.text=4", "moe.experts_per_modality.image=4"]
    args += ["moe.router=token_choice", "moe.top_k=2", "moe.score=softmax"]
    code = upcycle(args)
    printed = capsys.readouterr().out
    assert code == 0 and "verify: function preserved" in printed, printed
    assert "text and image tokens" in printed
    up = mm_moe.load_pretrained(out)
    text_ffn, image_ffn = (up.layers[0].ffn.experts.w_down[g * 4] for g in (0, 1))
    assert not torch.equal(text_ffn, image_ffn)  # each group copied its own modality's FFN


def test_a_mixed_group_cannot_take_per_modality_ffns(tmp_path):
    source = _native(tmp_path, {}, ["ffn"])
    args = [f"source={source}", f"out={tmp_path / 'up'}", "untie=[]"]
    with pytest.raises(ValueError, match="one group per modality"):
        upcycle([*args, "moe.experts_per_modality.mixed=4", "moe.router=token_choice"])


def test_a_tied_target_cannot_take_untied_attention(tmp_path):
    source = _native(tmp_path, {}, ["attention", "norms"])
    with pytest.raises(ValueError, match="one per modality .*untie"):
        upcycle([f"source={source}", f"out={tmp_path / 'up'}", "untie=[]"])


# ---- export ----
def _hf_logits(folder, ids, chameleon=False):
    cls = (
        transformers.ChameleonForConditionalGeneration
        if chameleon
        else transformers.AutoModelForCausalLM
    )
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_import_then_export_reproduces_the_source_and_its_logits(llama, chameleon, tmp_path):
    from mm_moe.export import ExportConfig
    from mm_moe.export import run as export
    from mm_moe.upcycle import hf_import

    for name, (path, _) in {"llama": llama, "chameleon": chameleon}.items():
        dense, out = tmp_path / f"{name}_dense", tmp_path / f"{name}_hf"
        assert upcycle([f"source={path}", "source_format=hf", f"out={dense}"]) == 0
        assert export(ExportConfig(str(dense), str(out), max_shard_mb=0.25)) == name
        assert (out / "model.safetensors.index.json").is_file()  # sharded
        assert (out / "tokenizer.json").is_file()
        source = hf_import.load_tensors(path)
        exported = hf_import.load_tensors(out)
        for key, value in source.items():  # every source tensor back, new vocab rows after
            got = exported[key]
            assert torch.equal(got[: value.shape[0]] if got.shape != value.shape else got, value)
        ours = mm_moe.load_pretrained(dense)
        ids = _mixed_ids(ours.vocab)
        with torch.no_grad():
            logits = ours(ids).logits
        theirs = _hf_logits(out, ids, chameleon=name == "chameleon")
        assert _text_columns_max_diff(logits, theirs, ours.vocab) <= 1e-5 * logits.abs().max()
        # imported again: the layout the export recorded, the same tokenizers
        again = tmp_path / f"{name}_again"
        assert upcycle([f"source={out}", "source_format=hf", f"out={again}"]) == 0
        assert mm_moe.load_tokenizers(again).vocab == ours.vocab
        assert mm_moe.load_pretrained(again).cfg.vocab_size == ours.cfg.vocab_size


def test_export_refuses_what_no_hugging_face_architecture_holds(tmp_path):
    from mm_moe.export import ExportConfig
    from mm_moe.export import run as export

    source = _native(tmp_path, {"experts_per_modality": {"text": 2, "image": 2}}, [])
    with pytest.raises(ValueError, match="experts grouped by modality.*expert_choice"):
        export(ExportConfig(str(source), str(tmp_path / "out")))


# ---- qwen3 and mixtral exports, loaded by transformers ----
MIXTRAL_MOE = {
    "experts_per_modality": {"mixed": 4},
    "router": "token_choice",
    "score": "softmax",
    "top_k": 2,
}


@pytest.mark.parametrize(
    "name, moe, model",
    [
        ("qwen3", {}, {}),  # qk_norm (RMSNorm over the head dim): Qwen3
        ("mixtral", MIXTRAL_MOE, {"qk_norm": False}),
        # QK-norm, the top-k unnormalized, layer 0 dense (mlp_only_layers)
        ("qwen3_moe", {**MIXTRAL_MOE, "renormalize": False, "layers": [1]}, {}),
    ],
)
def test_dense_and_moe_exports_give_transformers_our_logits(tmp_path, name, moe, model):
    """transformers loads the exported folder as Qwen3ForCausalLM / MixtralForCausalLM /
    Qwen3MoeForCausalLM and computes our model's logits."""
    from mm_moe.export import ExportConfig
    from mm_moe.export import run as export

    source = _native(tmp_path, moe, [], model)
    state = torch.load(source / "model.pt", weights_only=True)
    for key in [k for k in state if ".routers." in k]:  # distinct top-2: no near ties
        state[key] = state[key] * 30
    torch.save(state, source / "model.pt")
    out = tmp_path / "hf"
    assert export(ExportConfig(str(source), str(out))) == name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    names = {"qwen3": "Qwen3", "mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe"}
    assert type(hf).__name__ == names[name] + "ForCausalLM"
    ours = mm_moe.load_pretrained(source)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours(ids).logits, hf(input_ids=ids).logits.float()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
