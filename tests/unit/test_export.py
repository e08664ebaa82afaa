"""`python -m mm_moe.export`: every check comes before anything is removed (a refused export
leaves the previous one as it was; a source inside `out` is refused), and the Mixtral export
refuses each option that changes the model's function and HF Mixtral cannot express, naming
the key and the value Mixtral needs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from mm_moe.errors import UserError
from mm_moe.export import ExportConfig
from mm_moe.export import run as export

# One `mixed` group, token choice, softmax top-2 renormalized: what HF Mixtral computes.
MIXTRAL = {
    "experts_per_modality": {"mixed": 4},
    "router": "token_choice",
    "score": "softmax",
    "top_k": 2,
}
DENSE_QWEN3: dict = {}  # qk_norm=true (RMSNorm over the head dim): Qwen3
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1}
NO_QK_NORM = {"qk_norm": False}  # Mixtral has none


def _checkpoint(path: Path, moe: dict, model: dict | None = None, tokenizer=None) -> Path:
    """A weights-only checkpoint of a tiny model (random weights) at `path`; `tokenizer`: the
    tokenizer keys (default: the stand-ins)."""
    from mm_moe.checkpoint import experts, layout
    from mm_moe.config import TrainConfig, from_dict, to_dict

    model = {**TINY, **(model or {})}
    data = {"seq_len": 32}
    if tokenizer:  # the vocabulary the tokenizers make (synthetic data makes its own)
        data.update(source="webdataset", sources=[{"urls": str(path), "format": "text"}])
    cfg = {"model": model, "moe": moe, "data": data, "tokenizer": tokenizer or {}}
    cfg = from_dict(TrainConfig, cfg)
    torch.manual_seed(0)
    vocab = cfg.data.vocab(cfg.tokenizer)
    model_cfg = cfg.model.with_vocab(vocab.size)
    net = model_cfg.build(cfg.moe)
    cfg_dict = to_dict(cfg)
    cfg_dict["model"]["vocab_size"] = model_cfg.vocab_size
    path.mkdir(parents=True)
    state = {n: p.detach() for n, p in net.named_parameters()}
    state.update({n: b for n, b in net.named_buffers() if n in net.state_dict()})
    torch.save(experts.split_experts(state, experts.expert_keys(net)), path / "model.pt")
    (path / "config.yaml").write_text(yaml.safe_dump(cfg_dict))
    vocab.save(path / "vocab.yaml")
    meta = {"format_version": 2, "step": 0, "weights_only": True}
    (path / layout.META).write_text(json.dumps(meta))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---- item 4: checks before removal, the new folder renamed into place ----
def test_a_refused_export_leaves_the_previous_export_intact(tmp_path):
    out = tmp_path / "hf"
    good = _checkpoint(tmp_path / "qwen3", DENSE_QWEN3)
    assert export(ExportConfig(str(good), str(out))) == "qwen3"
    before = _files(out)
    assert "config.json" in before and "model.safetensors" in before

    moma = _checkpoint(tmp_path / "moma", {"experts_per_modality": {"text": 2, "image": 2}})
    with pytest.raises(UserError, match="experts grouped by modality"):
        export(ExportConfig(str(moma), str(out), overwrite=True))
    with pytest.raises(UserError):  # a source that does not load
        export(ExportConfig(str(tmp_path / "missing"), str(out), overwrite=True))
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "moma", "qwen3"]  # no leftovers


def test_an_accepted_overwrite_replaces_the_previous_export(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    source = _checkpoint(tmp_path / "mixtral", MIXTRAL, NO_QK_NORM)
    with pytest.raises(UserError, match="not empty; pass overwrite=true"):
        export(ExportConfig(str(source), str(out)))
    assert export(ExportConfig(str(source), str(out), overwrite=True)) == "mixtral"
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mixtral"]


def test_a_source_inside_out_is_refused_and_kept(tmp_path):
    out = tmp_path / "hf"
    source = _checkpoint(out / "run" / "step_00000000", DENSE_QWEN3)
    before = _files(source)
    for target in (out, source):
        with pytest.raises(UserError, match="lies inside out"):
            export(ExportConfig(str(source), str(target), overwrite=True))
    assert _files(source) == before


# ---- item 5: what Mixtral cannot express is refused, naming key and needed value ----
# (the option set, "key=value|the value Mixtral needs")
CANNOT_EXPRESS = [
    ({"moe": {"router_logits": "cosine"}}, "moe.router_logits=cosine|linear"),
    ({"moe": {"score": "sigmoid"}}, "moe.score=sigmoid|softmax"),
    ({"moe": {"renormalize": False}}, "moe.renormalize=false|true"),
    ({"moe": {"bias_update_rate": 0.01}}, "moe.bias_update_rate=0.01|0.0"),
    ({"moe": {"shared_experts": 1}}, "moe.shared_experts=1|0"),
    ({"moe": {"layers": [1]}}, "moe.layers=[1]|all"),
    ({"model": {"qk_norm": "head_layernorm"}}, "model.qk_norm=head_layernorm|false"),
    ({"model": {"norm_placement": "post"}}, "model.norm_placement=post|pre"),
]


@pytest.mark.parametrize(
    "option, refused", [pytest.param(*case, id=case[1].split("|")[0]) for case in CANNOT_EXPRESS]
)
def test_mixtral_export_refuses_each_option_it_cannot_express(option, refused):
    from mm_moe.config import TrainConfig, from_dict
    from mm_moe.upcycle.hf_export import architecture

    setting, needed = refused.split("|")
    key = setting.split("=")[0]
    model = {**TINY, **NO_QK_NORM, "vocab_size": 64, **option.get("model", {})}
    cfg = from_dict(TrainConfig, {"model": model, "moe": {**MIXTRAL, **option.get("moe", {})}})
    with pytest.raises(UserError) as info:
        architecture(cfg.model.build(cfg.moe))
    assert f"{setting} (Mixtral needs {key}={needed})" in str(info.value)
    assert str(info.value).count("Mixtral needs") == 1  # that key alone


@pytest.mark.parametrize(
    "option, refused",
    [
        ({"router_logits": "cosine"}, "moe.router_logits=cosine|linear"),
        ({"shared_experts": 1}, "moe.shared_experts=1|0"),
    ],
)
def test_qwen3_moe_export_refuses_what_it_cannot_express(option, refused):
    from mm_moe.config import TrainConfig, from_dict
    from mm_moe.upcycle.hf_export import architecture

    setting, needed = refused.split("|")
    model = {**TINY, "vocab_size": 64}  # qk_norm=true: RMSNorm over the head dim
    cfg = from_dict(TrainConfig, {"model": model, "moe": {**MIXTRAL, **option}})
    with pytest.raises(UserError, match=re.escape(f"{setting} (Qwen3-MoE needs ")):
        architecture(cfg.model.build(cfg.moe))
    # unnormalized top-k and dense layers Qwen3-MoE can express
    ok = {**MIXTRAL, "renormalize": False, "layers": [1]}
    cfg = from_dict(TrainConfig, {"model": model, "moe": ok})
    assert architecture(cfg.model.build(cfg.moe)) == "qwen3_moe"


def test_a_supported_mixtral_still_exports(tmp_path):
    # moe.layers listing every layer is every layer
    source = _checkpoint(tmp_path / "src", {**MIXTRAL, "layers": [0, 1]}, NO_QK_NORM)
    out = tmp_path / "hf"
    assert export(ExportConfig(str(source), str(out))) == "mixtral"
    config = json.loads((out / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)


def test_export_from_the_latest_pointer_writes_files_others_can_read(tmp_path):
    """`source=<checkpoints>/latest` (the pointer file) names the step it points at; the
    safetensors file gets the umask's mode as config.json does (safetensors writes 0600)."""
    from mm_moe.checkpoint import layout

    checkpoints = tmp_path / "checkpoints"
    _checkpoint(checkpoints / "step_00000003", MIXTRAL, NO_QK_NORM)
    (checkpoints / layout.LATEST).write_text("step_00000003")
    out = tmp_path / "hf"
    umask = os.umask(0o022)
    try:
        assert export(ExportConfig(str(checkpoints / layout.LATEST), str(out))) == "mixtral"
    finally:
        os.umask(umask)
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_export_in_bfloat16_is_the_float32_export_rounded(tmp_path):
    from safetensors.torch import load_file

    source = _checkpoint(tmp_path / "src", {}, NO_QK_NORM)
    export(ExportConfig(str(source), str(tmp_path / "fp32")))
    export(ExportConfig(str(source), str(tmp_path / "bf16"), dtype="bfloat16"))
    full = load_file(tmp_path / "fp32" / "model.safetensors")
    half = load_file(tmp_path / "bf16" / "model.safetensors")
    assert full.keys() == half.keys()
    for name, t in full.items():
        assert t.dtype == torch.float32 and half[name].dtype == torch.bfloat16
        assert torch.equal(half[name], t.to(torch.bfloat16)), name
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"


def test_loading_a_step_a_running_run_prunes_meanwhile_loads_the_new_latest(tmp_path, monkeypatch):
    """generate beside a run with checkpoint.keep_last: `latest` named step 3, the run wrote
    step 4 and removed step 3 before its model.pt was read. The load follows the new latest
    (it failed with "the file is missing; resume from a complete step beside it")."""
    import shutil

    import mm_moe
    from mm_moe.checkpoint import layout
    from mm_moe.eval import pretrained

    checkpoints = tmp_path / "run" / "checkpoints"
    _checkpoint(checkpoints / "step_00000003", DENSE_QWEN3)
    (checkpoints / layout.LATEST).write_text("step_00000003")
    real_load, calls = pretrained._load, []

    def pruned_meanwhile(step_dir, tokenizer):
        calls.append(step_dir.name)
        if step_dir.name == "step_00000003":  # the run publishes step 4, prunes step 3
            shutil.copytree(step_dir, checkpoints / "step_00000004", dirs_exist_ok=True)
            (checkpoints / layout.LATEST).write_text("step_00000004")
            (step_dir / "model.pt").unlink()
            shutil.rmtree(step_dir)
        return real_load(step_dir, tokenizer)

    monkeypatch.setattr(pretrained, "_load", pruned_meanwhile)
    model = mm_moe.load_pretrained(tmp_path / "run")
    assert calls == ["step_00000003", "step_00000004"] and model.cfg.n_layers == 2
    # a step named explicitly is not replaced by another
    (checkpoints / layout.LATEST).write_text("step_00000003")
    _checkpoint(checkpoints / "step_00000003", DENSE_QWEN3)
    calls.clear()
    with pytest.raises(UserError, match="step_00000003 was removed while it was being loaded"):
        mm_moe.load_pretrained(checkpoints / "step_00000003")
