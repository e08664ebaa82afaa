"""Upcycle a dense checkpoint into a checkpoint of the target model and write it.

The written directory is a weights-only checkpoint of this project:

    <out>/model.pt      every parameter once, experts one entry each (format 2)
    <out>/config.yaml   the target's resolved training config
    <out>/meta.json     step 0, `weights_only: true`, where it came from (written last)
    <out>/experiment/upcycled.yaml
                        a Hydra overlay with the target's model, moe and vocabulary, so that
                        `--config-dir <out> experiment=upcycled checkpoint.resume=<out>` trains it

`checkpoint.resume=<out>` starts from it with a fresh optimizer, LR schedule and data position,
at any expert-parallel size; `mm_moe.load_pretrained(<out>)` loads it for inference.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import yaml

import mm_moe.upcycle.hf_import as hf_import
import mm_moe.upcycle.recorded_vocab as recorded_vocab
from mm_moe.checkpoint import experts, layout
from mm_moe.config.overlay import OVERLAY_KEYS
from mm_moe.config.schema import TrainConfig
from mm_moe.config.validate import to_dict
from mm_moe.errors import UserError
from mm_moe.model.config import ModelConfig
from mm_moe.tokenization.vocab import Vocab
from mm_moe.upcycle.config import UpcycleConfig
from mm_moe.upcycle.ops import UpcycleOptions, build_state
from mm_moe.utils.folders import replace_dir, sibling_dir
from mm_moe.utils.scrub import scrub

log = logging.getLogger(__name__)

OVERLAY = Path("experiment") / "upcycled.yaml"
# Fields that fix the shapes the dense weights are copied into: the target must keep them.
ARCH_FIELDS = (
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_dim",
    "qk_norm",
    "norm_placement",
    "tie_embeddings",
)
# Fields that change the function but not the shapes: allowed, with a warning.
FUNCTION_FIELDS = ("rope_theta", "norm_eps")


def saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters once each (tied weights under their first name) and persistent buffers."""
    state = {n: p.detach() for n, p in model.named_parameters()}
    persistent = model.state_dict()
    for n, b in model.named_buffers():
        if n in persistent:
            state[n] = b.detach()
    return state


def load_source(source: str, source_format: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The dense source's ModelConfig (vocab resolved) and its weights by this project's names."""
    if source_format == "hf":
        cfg, model = hf_import.import_dense(source)
        return cfg, saved_state(model)
    from mm_moe.eval.pretrained import load_pretrained

    model = load_pretrained(source)
    cfg, moe = model.cfg, model.moe_cfg
    one_expert = moe.enabled and not moe.shared_experts
    one_expert = one_expert and all(g.num_experts == 1 for g in moe.groups())
    layers_ok = moe.layers == "all" or sorted(moe.layers) == list(range(cfg.n_layers))
    if cfg.mod.layers:
        raise UserError(
            f"source={source} has mixture-of-depths layers (model.mod.layers={cfg.mod.layers}): "
            "upcycling does not support mixture-of-depths sources. It maps a dense block's "
            "weights onto the experts and has no mapping for the MoD routers, which decide "
            "the tokens a routed block skips, so the result would not keep the source's "
            "function. Upcycle a source trained without model.mod.layers"
        )
    if moe.enabled and not (one_expert and layers_ok):
        raise UserError(
            f"source={source} is neither dense (model.untie allowed) nor one expert per "
            f"modality group in every layer (moe.experts_per_modality="
            f"{moe.experts_per_modality}, moe.granularity={moe.granularity}, "
            f"moe.layers={moe.layers}): upcycling copies one FFN per modality"
        )
    return cfg, saved_state(model)


def data_vocab(cfg: TrainConfig) -> Vocab:
    """The vocabulary the target will train on (the data source's, as training builds it)."""
    return cfg.data.vocab(cfg.tokenizer)


TOKENIZER_DIR, VOCAB_FILE = "tokenizer", "vocab.yaml"


def hf_layout(ucfg: UpcycleConfig, target: TrainConfig) -> Vocab:
    """The vocabulary of a Hugging Face source, laid out by the import (hf_import.source_layout)
    or, for an mm_moe export, as it recorded it (recorded_vocab.py), and the target's tokenizer
    config pointed at what `write` puts in `out`: the source's own tokenizer (tokenizer.text=hf),
    Chameleon's VQGAN (tokenizer.image=chameleon) or the target's trained VQ (or an export's
    recorded sentencepiece and VQ), copied to <out>/tokenizer/, and the layout, <out>/vocab.yaml."""
    from mm_moe.tokenization.hf_text import has_tokenizer

    hf = hf_import.read_config(ucfg.source)
    tok, out = target.tokenizer, Path(ucfg.out).resolve()
    if hf.get("model_type") == "chameleon":
        tok.image = "chameleon"
    codebook = None if tok.image == "chameleon" else tok._image().codebook_size
    # An mm_moe export records its layout (recorded_vocab.py): kept, not appended to.
    recorded = recorded_vocab.read_vocab(ucfg.source, hf)
    if recorded is None:
        vocab = hf_import.source_layout(ucfg.source, hf, codebook or 0)
    else:
        vocab = recorded
        if codebook is not None:
            recorded_vocab.check_image_tokenizer(vocab, codebook, tok, ucfg.source)
    # sentencepiece: only an export's own, its text.model in the source's mm_moe_tokenizer/
    own_sp = recorded is not None and (Path(tok.path) / "text.model").is_file()
    if has_tokenizer(ucfg.source):
        tok.text = "hf"
    elif tok.text == "hf" or (tok.text == "sentencepiece" and not own_sp):
        raise UserError(
            f"source={ucfg.source} has no tokenizer file; tokenizer.text={tok.text} cannot "
            "follow it (use the default or a pre-tokenized data source)"
        )
    elif (Path(ucfg.source) / recorded_vocab.TOKENIZER_FILE).is_file():
        log.info(
            "source=%s: keeping the vocabulary layout and tokenizers its export recorded (%s, %s)",
            ucfg.source,
            recorded_vocab.VOCAB_FILE,
            recorded_vocab.TOKENIZER_FILE,
        )
    else:
        # Any stand-in would map text onto the source's unrelated ids without a word.
        tok.text = "none"
        log.warning(
            "source=%s has no tokenizer.json or tokenizer.model: the overlay says "
            "tokenizer.text=none, so training reads only shards of its ids (data.sources "
            "format tokens, %d text ids); or add tokenizer.text=hf tokenizer.path=FOLDER "
            "with the source's tokenizer",
            ucfg.source,
            hf["vocab_size"],
        )
    tok.path, tok.vocab = str(out / TOKENIZER_DIR), str(out / VOCAB_FILE)
    return vocab


def _write_tokenizer(
    tmp: Path, ucfg: UpcycleConfig, target: TrainConfig, vocab: Vocab, vq_dir: str
) -> None:
    """<out>/vocab.yaml, and the tokenizer files the target's config names in <out>/tokenizer
    (a trained VQ from `vq_dir`, the command's tokenizer.path)."""
    vocab.save(tmp / VOCAB_FILE)
    if ucfg.source_format != "hf":
        return
    hf_import.copy_tokenizer(ucfg.source, tmp / TOKENIZER_DIR)
    tok = target.tokenizer
    names = ("vq.pt", "vq.yaml", "metrics.json") if tok.image == "vq" else ()
    # the target's trained VQ beside the source's text tokenizer; an export's own sentencepiece
    names += ("text.model",) if tok.text == "sentencepiece" else ()
    for name in names:
        src = Path(vq_dir) / name
        if src.is_file():
            shutil.copy(src, tmp / TOKENIZER_DIR / name)


def resolve_target(
    target: TrainConfig, source_cfg: ModelConfig, source_format: str, vocab: Vocab
) -> None:
    """Check the target against the source and size its vocabulary (in place).

    The target keeps every source id's row; ids beyond the source's vocabulary (image codes and
    special tokens of an imported Hugging Face model) get new rows."""
    for name in ARCH_FIELDS:
        want, got = getattr(source_cfg, name), getattr(target.model, name)
        if want != got:
            raise UserError(
                f"model.{name}={got} differs from the source checkpoint's {want}: upcycling "
                "copies the dense weights, so the target keeps the source's shapes"
            )
    for name in FUNCTION_FIELDS:
        if getattr(source_cfg, name) != getattr(target.model, name):
            log.warning(
                "model.%s=%s differs from the source's %s: the upcycled model computes another "
                "function",
                name,
                getattr(target.model, name),
                getattr(source_cfg, name),
            )
    target.model.vocab_size = max(target.model.vocab_size, source_cfg.vocab_size, vocab.size)


def _check_out(out: Path, source: str, overwrite: bool) -> None:
    resolved = out.resolve()
    forbidden = {Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve()}
    if resolved in forbidden or Path(source).resolve().is_relative_to(resolved):
        raise UserError(f"out={out} would replace the source or a top-level directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"out={out} is not empty; pass overwrite=true to replace it, or choose another out"
        )


def _overlay(cfg_dict: dict) -> str:
    """Hydra experiment overlay: the target's model, moe and tokenizers, nothing else (training
    reads it with mm_moe.config.overlay, which refuses any other key: a checkpoint is data)."""
    overlay = {key: cfg_dict[key] for key in OVERLAY_KEYS}
    header = (
        "# @package _global_\n"
        "# Written by mm_moe.upcycle: the upcycled model and the tokenizers it was sized for.\n"
        "# python -m mm_moe.train --config-dir <this checkpoint> experiment=upcycled "
        "checkpoint.resume=<this checkpoint>\n"
    )
    return header + yaml.safe_dump(overlay, sort_keys=False)


def _tokenizer_digest(tok, out: Path, tmp: Path) -> str | None:
    """The digest of the tokenizer the target names, its files read where they are before
    `tmp` becomes `out` (the digest is of contents, not of paths)."""
    from dataclasses import replace

    from mm_moe.tokenization.digest import tokenizer_digest

    def now(path: str) -> str:
        inside = path and Path(path).resolve().is_relative_to(out.resolve())
        return str(tmp / Path(path).resolve().relative_to(out.resolve())) if inside else path

    return tokenizer_digest(replace(tok, path=now(tok.path), vocab=now(tok.vocab)))


def write(
    ucfg: UpcycleConfig,
    target: TrainConfig,
    src_state: dict[str, torch.Tensor],
    vocab: Vocab,
    vq_dir: str = "",
) -> tuple[Path, list[str]]:
    """Build the target from `src_state` and write it to `ucfg.out`; returns (out, names of
    parameters that keep a fresh initialisation). `vq_dir`: where a trained VQ the target's
    tokenizer names lies before the import points tokenizer.path at <out>/tokenizer."""
    out = Path(ucfg.out)
    _check_out(out, ucfg.source, ucfg.overwrite)
    torch.manual_seed(ucfg.seed)  # the target's fresh parameters (aux routers, MoD routers)
    model = target.model.build(target.moe)
    gen = torch.Generator().manual_seed(ucfg.seed + 1)
    opts = UpcycleOptions(
        drop_ratio=ucfg.drop_ratio,
        router_init_std=ucfg.router_init_std,
        expert_noise=ucfg.expert_noise,
        new_rows_noise=ucfg.new_rows_noise,
    )
    state, fresh = build_state(src_state, model, opts, gen)
    cfg_dict = scrub(to_dict(target))  # secrets (say, in a pipe: url) never reach the files
    cfg_dict["checkpoint"]["resume"] = "none"
    meta = scrub(
        {
            # state.FORMAT_VERSION (state.py is not imported here: it pulls in DeepSpeed).
            "format_version": 2,
            "step": 0,
            "weights_only": True,
            "world_size": 1,
            "expert_parallel_size": 1,
            "upcycled_from": {
                "source": str(Path(ucfg.source).resolve()),
                **{k: v for k, v in to_dict(ucfg).items() if k not in ("source", "out")},
            },
            "fresh_parameters": fresh,
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_dir(out, "upcycle")
    try:
        (tmp / OVERLAY.parent).mkdir(parents=True, exist_ok=True)
        torch.save(experts.split_experts(state, experts.expert_keys(model)), tmp / "model.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        (tmp / OVERLAY).write_text(_overlay(cfg_dict))
        _write_tokenizer(tmp, ucfg, target, vocab, vq_dir)
        meta["tokenizer_digest"] = _tokenizer_digest(target.tokenizer, out, tmp)
        # meta.json last: a directory holding it is a complete checkpoint.
        (tmp / layout.META).write_text(json.dumps(meta, indent=1))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once in place
    return out, fresh
