"""Save and load the whole training state: model, optimizer, LR schedule, RNG states, data
position, step and the resolved config.

Tensors are stored whole, and every expert once under its global identity (see
mm_moe.checkpoint.experts), so a checkpoint loads at any world size, ZeRO stage and
expert-parallel size. The engine's tensors cross from and to mm_moe.parallel once per save and
once per load, as one {name: tensor} dict (`full_state.local_state` / `load_local_state`);
tensors.py maps that dict to the files and back. Files are read with
torch.load(weights_only=True): loading never runs code.

Format 2 stores experts one per entry (`layers.3.ffn.experts.image.1.w_gate_up`); format 1
(stacked `layers.3.ffn.experts.w_gate_up`, world-size independent but without expert
parallelism) still loads.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from mm_moe.checkpoint import layout, rng, tensors
from mm_moe.errors import UserError
from mm_moe.parallel import full_state
from mm_moe.utils.scrub import scrub

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def _gather_to_main(obj, world_size: int, rank: int) -> list | None:
    if world_size == 1:
        return [obj]
    out = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


@dataclass
class StagedCheckpoint:
    """A checkpoint in CPU memory on rank 0, ready for `write` (maybe in a background thread):
    nothing in it aliases live training state, so training may go on at once."""

    step: int
    model: dict
    optimizer: dict
    rng: list
    config_yaml: str
    meta_json: str
    vocab_yaml: str | None = None  # the vocabulary the model was trained on


@dataclass
class TrainState:
    """Everything a checkpoint holds, as the training run has it at the end of `step`: the
    engine (model, optimizer, `engine.lr_scheduler`), the loader's position, the resolved
    config, and `extra` meta (e.g. the wandb run id, the guard's and the FLOPs meter's
    state)."""

    step: int
    engine: object
    loader: object
    config: dict
    rank: int
    world_size: int
    extra: dict = field(default_factory=dict)
    expert_parallel_size: int = 1  # the run's parallel.expert_parallel_size, for meta.json


def stage(state: TrainState) -> StagedCheckpoint | None:
    """Collective: copy the whole training state to CPU memory on rank 0 (None elsewhere)."""
    engine = state.engine
    # Fresh CPU copies (`.cpu().clone()`) on rank 0, the writer; the others only take part.
    local = full_state.local_state(engine, keep=state.rank == 0)
    rng_states = _gather_to_main(rng.capture(), state.world_size, state.rank)
    # Collective too: the webdataset loader gathers its streams' positions to rank 0.
    data_state = state.loader.state_dict()
    if state.rank != 0:
        return None
    model_state, optim_state = tensors.to_files(local, engine.module)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "world_size": state.world_size,
        "expert_parallel_size": state.expert_parallel_size,
        "scheduler": engine.lr_scheduler.state_dict(),
        "data": data_state,
        **state.extra,
    }
    # Serialised now: the scheduler's and loader's dicts move on with training.
    return StagedCheckpoint(
        state.step,
        model_state,
        optim_state,
        rng_states,
        yaml.safe_dump(scrub(state.config), sort_keys=False),
        json.dumps(scrub(meta), indent=1),
        _vocab_yaml(state.loader),
    )


def _vocab_yaml(loader) -> str | None:
    vocab = getattr(loader, "vocab", None)
    if vocab is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        vocab.save(Path(tmp) / layout.VOCAB)
        return (Path(tmp) / layout.VOCAB).read_text()


def save_file(obj, path: Path) -> None:
    """One checkpoint file: text as is, anything else with torch.save."""
    if isinstance(obj, str):
        path.write_text(obj)
    else:
        torch.save(obj, path)


def _free_space(root: Path) -> str:
    """What torch.save's zip writer does not say: how full the disk is (a full disk reads
    `unexpected pos ...`). A save needs room for one more step: keep_last prunes after it."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    return f" ({free / 2**20:.0f} MiB free on the disk of {root}; a full disk fails this way)"


def write(staged: StagedCheckpoint, root: Path, keep_last: int, save=save_file) -> Path:
    """Rank 0: write under a temporary name (each file with `save(obj, path)`), then publish
    (rename, move `latest`). On any error the temporary directory is removed and the previous
    checkpoint is untouched; the OSError names the file that failed."""
    tmp = layout.new_tmp_dir(root, staged.step)
    try:
        files = {
            "model.pt": staged.model,
            "optimizer.pt": staged.optimizer,
            "rng.pt": {"ranks": staged.rng},
            "config.yaml": staged.config_yaml,
            **({layout.VOCAB: staged.vocab_yaml} if staged.vocab_yaml else {}),
            # meta.json is written last: a step directory with it is complete.
            layout.META: staged.meta_json,
        }
        for name, obj in files.items():
            path = tmp / name
            try:
                save(obj, path)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
            except RuntimeError as exc:  # torch.save reports a full disk as a RuntimeError
                raise OSError(errno.EIO, f"{exc}{_free_space(root)}", str(path)) from exc
        final = layout.publish(root, tmp, staged.step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        layout.prune(root, keep_last, staged.step)
    except OSError as exc:  # the checkpoint is complete; old ones go at the next save
        log.warning("checkpoint.keep_last: could not remove old checkpoints in %s: %s", root, exc)
    return final


def _load_scheduler(scheduler, state: dict) -> None:
    """Restore the LR schedule's position. The learning rates follow from it and from this
    run's param groups (each group's base lr: routers may have their own), so the groups may
    differ from the saving run's (expert parallelism puts experts in groups of their own)."""
    scheduler.last_epoch = state["last_epoch"]
    scheduler._step_count = state.get("_step_count", state["last_epoch"] + 1)
    lrs = [
        base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _written_config(step_dir: Path):
    """The step's config.yaml as written (None where there is none)."""
    return layout.read_config(step_dir, required=False)


def _compare_with_written(step_dir: Path, module) -> None:
    """The step's model against this run's (`_check_same_architecture`); a step without its
    config.yaml (every save writes one) is said: a changed model key would go unnoticed."""
    written = _written_config(step_dir)
    if isinstance(written, dict) and "model" in written:
        _check_same_architecture(step_dir, module, written)
        return
    log.warning(
        "%s has no %s (every save writes one): the model is not compared with this run's, so "
        "a changed model key would train another function",
        step_dir,
        layout.CONFIG,
    )


def _check_same_architecture(step_dir: Path, module, written: dict | None = None) -> None:
    """Name the config keys in which a checkpoint's model differs from this run's, in shape
    or in function (rope_theta, norm_eps, moe.top_k, ...: every model and moe
    field but the training- and speed-only ones, same_function.py), rather than listing
    missing tensors or training another function without a word: such a checkpoint
    (mm_moe.upcycle) usually has another architecture than the run's defaults."""
    from mm_moe.checkpoint.same_function import differences, function_fields
    from mm_moe.config.legacy import upgrade_saved_config
    from mm_moe.config.validate import from_dict
    from mm_moe.model.config import ModelConfig
    from mm_moe.model.moe.config import MoEConfig

    if written is None:
        written = layout.read_config(step_dir)
    written = upgrade_saved_config(written)  # keys renamed since, or dropped as no-ops
    try:
        saved = {
            **function_fields(from_dict(ModelConfig, written.get("model", {}), "model"), "model"),
            **function_fields(from_dict(MoEConfig, written.get("moe", {}), "moe"), "moe"),
        }
    except UserError as exc:  # a cut file can parse, into values nobody saved
        raise UserError(
            f"{step_dir / layout.CONFIG} is damaged ({exc}): it must be the config the save "
            "wrote. Resume from another step (checkpoint.resume=PATH of a step_XXXXXXXX "
            "directory)"
        ) from None
    run = {
        **function_fields(module.cfg, "model"),
        **function_fields(module.moe_cfg, "moe"),
    }
    diffs = differences(saved, run)
    if diffs:
        overlay = step_dir / "experiment" / "upcycled.yaml"
        saved_moe = written.get("moe", {}).get("experts_per_modality")
        if overlay.is_file():
            hint = (
                f" Train with the checkpoint's model: --config-dir {step_dir} experiment=upcycled"
            )
        elif not saved_moe and module.moe_cfg.enabled:  # dense weights into an MoE run
            hint = (
                " A dense checkpoint becomes an MoE one with `python -m mm_moe.upcycle "
                f"source={step_dir} out=FOLDER moe=...` (docs/upcycling.md), which trains on "
                "with --config-dir FOLDER experiment=upcycled checkpoint.resume=FOLDER."
            )
        else:
            hint = " Pass the model.* and moe.* values it was written with."
        raise UserError(
            f"checkpoint.resume={step_dir}: its model differs from this run's: "
            + "; ".join(diffs)
            + "."
            + hint
        )


def _layout(vocab) -> str:
    image = (
        f"image codes {vocab.image_offset}..{vocab.image_offset + vocab.image_size - 1}"
        if not vocab.image_ids
        else f"{vocab.image_size} image codes at the ids of its tokenizer"
    )
    return (
        f"text 0..{vocab.text_size - 1}, bos/eos/pad/boi/eoi {vocab.bos}/{vocab.eos}/"
        f"{vocab.pad}/{vocab.boi}/{vocab.eoi}, {image}, {vocab.size} ids"
    )


def check_vocabulary(step_dir: Path, vocab) -> None:
    """The run's data must make the ids the checkpoint's weights were trained on (its
    vocab.yaml): other data or tokenizer keys move text and image ids, and the model would
    go on training on ids that mean other tokens (an upcycled checkpoint pins
    model.vocab_size, so nothing else notices while the size does not grow)."""
    from mm_moe.tokenization.vocab import Vocab

    path = Path(step_dir) / layout.VOCAB
    if not path.is_file() or vocab is None:
        return
    saved = Vocab.load(path)
    if saved != vocab:
        raise UserError(
            f"checkpoint.resume={step_dir}: its weights were trained on the vocabulary "
            f"{_layout(saved)}; this run's data make {_layout(vocab)}. The ids would mean "
            f"other tokens: give the data and tokenizer keys it was made with (the `data` and "
            f"`tokenizer` of {Path(step_dir) / layout.CONFIG}, e.g. data.synthetic.*)"
        )


def _load_weights_only(step_dir: Path, meta: dict, engine) -> dict:
    """A checkpoint with model weights but no optimizer, schedule, RNG or data state (an
    upcycled or imported model), or a whole one asked for its weights alone
    (checkpoint.weights_only): load the weights at any expert-parallel size and start
    training from step 0 with this run's fresh optimizer, LR schedule, data position and step
    guard (nothing else of the source's meta: its wandb run, its FLOPs)."""
    _compare_with_written(step_dir, engine.module)
    weights = tensors.read(step_dir, engine.module, optimizer=False)
    full_state.load_local_state(engine, weights, str(step_dir))
    log.info(
        "loaded the weights-only checkpoint %s: fresh optimizer, LR schedule and data "
        "position, starting at step 0",
        step_dir,
    )
    engine.global_steps = 0
    return {"step": 0, "weights_only": True}


def load(
    step_dir: Path, engine, loader, rank: int, world_size: int, weights_only: bool = False
) -> dict:
    """Collective under ZeRO. Restores everything `stage` captured (the LR schedule into
    `engine.lr_scheduler`), or with `weights_only` the model weights alone; returns the meta
    dict."""
    scheduler = engine.lr_scheduler
    meta = layout.read_meta(step_dir)
    if "format_version" not in meta:
        raise UserError(
            f"{step_dir / layout.META} is damaged (no format_version): every save writes it. "
            "Resume from another step (checkpoint.resume=PATH of a step_XXXXXXXX directory)"
        )
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise UserError(
            f"{step_dir}: checkpoint format {meta.get('format_version')} is not "
            f"supported (this version reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if meta.get("weights_only") or weights_only:
        return _load_weights_only(step_dir, meta, engine)
    missing = [k for k in ("step", "world_size", "scheduler", "data") if k not in meta]
    if missing:
        raise UserError(
            f"{step_dir / layout.META} is damaged (no {', '.join(missing)}): a training save "
            "writes them all. Resume from another step, or checkpoint.weights_only=true for "
            "its weights alone"
        )
    # A resumed run that changed what the weights compute (moe.score, rope_theta, ...) would
    # go on training another function without a word; training-only keys may change. (A
    # step without the run's config, made by hand or by a test, has nothing to compare.)
    _compare_with_written(step_dir, engine.module)
    saved = tensors.read(step_dir, engine.module)
    rng_states = layout.read_tensors(step_dir / "rng.pt")["ranks"]
    # The one hand-over to parallel/: every file is read before the engine changes.
    full_state.load_local_state(engine, saved, str(step_dir))
    _load_scheduler(scheduler, meta["scheduler"])
    loader.load_state_dict(meta["data"])
    if meta["world_size"] == world_size:
        rng.restore(rng_states[rank])
    else:
        # Per-rank RNG streams cannot be mapped to another world size; reseed deterministically.
        if rank == 0:
            log.warning(
                "checkpoint saved at world size %d, resuming at %d: RNG states reseeded",
                meta["world_size"],
                world_size,
            )
        rng.seed_all(meta["step"] * 1_000_003 + rank)
    engine.global_steps = meta["step"]
    return meta
