"""`build_training(cfg) -> Training`: every part of a run, built once from the validated config
(the process group, data, model, the parallelized engine, resume, checkpointer, metrics,
held-out evaluation). `Trainer` (trainer.py) runs it; benchmarks and tests build the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm_moe.checkpoint import layout
from mm_moe.checkpoint import state as ckpt_state
from mm_moe.checkpoint.async_save import Checkpointer
from mm_moe.checkpoint.rng import seed_all
from mm_moe.config.schema import TrainConfig
from mm_moe.config.validate import from_dict, to_dict
from mm_moe.data.prefetch import Prefetcher
from mm_moe.errors import UserError
from mm_moe.eval.heldout import HeldoutEval, heldout_batches
from mm_moe.model.attention_mask import check_backend, resolve_backend, sdpa_call
from mm_moe.model.config import ModelConfig
from mm_moe.model.flops import FlopsMeter
from mm_moe.model.moe.experts import gemm_paths
from mm_moe.parallel.config import optimizer_zero_stage
from mm_moe.parallel.distributed import (
    DistInfo,
    adopt_slurm_env,
    gather_objects,
    init_distributed,
)
from mm_moe.parallel.expert_parallel import check_expert_parallel
from mm_moe.parallel.parallelize import parallelize, uses_bf16
from mm_moe.tokenization.digest import check as check_tokenizer
from mm_moe.tokenization.digest import tokenizer_digest
from mm_moe.trainer import fault_injection, run_lock
from mm_moe.trainer.guard import StepGuard
from mm_moe.trainer.host_memory import warn_if_beyond_host_memory, warn_if_cpu_busy
from mm_moe.trainer.metrics import METRICS_FILE, MetricsLogger
from mm_moe.trainer.peak import device_name, peak_flops
from mm_moe.utils.scrub import install_log_scrubber, scrub

log = logging.getLogger("mm_moe")


@dataclass
class Training:
    """A built run. `start_step` is where it resumes (0 for a fresh start)."""

    cfg: TrainConfig
    dist: DistInfo
    model_cfg: ModelConfig
    engine: object
    loader: object
    guard: StepGuard
    checkpointer: Checkpointer
    metrics: MetricsLogger
    flops: FlopsMeter
    evaluator: HeldoutEval | None
    config_dict: dict
    start_step: int = 0
    wandb_id: str | None = None
    peak_flops: float = 0.0
    facts: dict = field(default_factory=dict)  # kernels chosen, for the first metrics row
    tokenizer_digest: str | None = None  # recorded in each checkpoint (tokenization/digest.py)

    def state(self, step: int) -> ckpt_state.TrainState:
        """What a checkpoint of `step` holds."""
        extra = {
            "wandb_id": self.wandb_id,
            "flops_cumulative": self.flops.state_dict(),
            "tokenizer_digest": self.tokenizer_digest,
            **self.guard.state_dict(),
        }
        return ckpt_state.TrainState(
            step,
            self.engine,
            self.loader,
            self.config_dict,
            self.dist.rank,
            self.dist.world_size,
            extra,
            expert_parallel_size=self.cfg.parallel.expert_parallel_size,
        )


def start_processes(cfg: TrainConfig) -> tuple[TrainConfig, DistInfo]:
    """The process group, and the config with the sizes that follow the world size."""
    install_log_scrubber()
    adopt_slurm_env()  # one Slurm task per process (submitit): before the world-size checks
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = cfg.for_world(world)
    check_expert_parallel(cfg.parallel, cfg.moe, world)
    dist = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s, cfg.trainer.device)
    check_same_config(cfg)  # before the first collective that assumes it (expert groups)
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    if dist.device.type == "cpu" and dist.is_main:
        warn_if_cpu_busy(torch.get_num_threads(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cfg.trainer.grad_accumulation_steps(dist.world_size)  # validates divisibility
    return cfg, dist


def check_same_config(cfg: TrainConfig) -> None:
    """Every rank must run the same config: nodes launched with different overrides trained
    with a learning rate per rank, or hung building expert-parallel groups of different sizes.
    One all-gather of a digest; the differing keys are named on a mismatch."""
    flat = _flat(scrub(to_dict(cfg)))
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()
    if len(set(gather_objects(digest))) == 1:
        return
    every = gather_objects(flat)
    keys = sorted({k for f in every for k in f if len({repr(g.get(k)) for g in every}) > 1})
    by_rank = lambda k: ", ".join(f"rank {r} {f.get(k)!r}" for r, f in enumerate(every))  # noqa: E731
    shown = "; ".join(f"{k}: {by_rank(k)}" for k in keys[:5])
    raise UserError(
        f"the ranks run different configs ({len(keys)} keys differ: {shown}). Launch every node "
        "with the same overrides"
    )


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_folders(cfg: TrainConfig) -> None:
    """trainer.run_dir and checkpoint.dir are folders, or can be made: said at the start, not
    at the first save after the steps before it are spent."""
    folders = {"trainer.run_dir": cfg.trainer.run_dir, "checkpoint.dir": cfg.checkpoint.dir}
    for key, path in folders.items():
        if Path(path).exists() and not Path(path).is_dir():
            raise UserError(f"{key}={path} is a file; it must be a folder (or not exist yet)")
        existing = next(
            p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists()
        )
        if not existing.is_dir():
            raise UserError(f"{key}={path} cannot be made: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{key}={path} cannot be written: {existing} is not writable")


def _own(root: Path, step_dir: Path) -> bool:
    """The step is one of this run's own checkpoints (in its checkpoint.dir)."""
    return root.resolve() in step_dir.resolve().parents


def _resume_dir(cfg: TrainConfig, dist: DistInfo) -> Path | None:
    """The checkpoint to resume from; a fresh line of checkpoints is never started on top of
    an existing one unasked (also when resuming another run's or an upcycled checkpoint)."""
    root = Path(cfg.checkpoint.dir)
    resume_dir = layout.resolve_resume(cfg.checkpoint.resume, root)
    own = resume_dir is not None and _own(root, resume_dir)
    if not own and (restarts := restart_count()) and layout.complete_steps(root):
        # A requeued or restarted job reruns its first command: where that started from (a
        # fresh start, another run's checkpoint) is behind it; its own checkpoints are not.
        resume_dir = layout.latest_step_dir(root)
        log.warning(
            "restart %d of this job: resuming its own latest checkpoint %s (checkpoint.resume=%s "
            "and checkpoint.overwrite apply to its first start only)",
            restarts,
            resume_dir,
            cfg.checkpoint.resume,
        )
        own = True
    if not own:
        steps = layout.complete_steps(root)
        damaged = [] if steps else layout.step_folders(root)  # saved once, none whole now
        if steps and not cfg.checkpoint.overwrite:
            raise UserError(
                f"checkpoint.dir={root} already holds checkpoints (latest step {steps[-1]}). "
                "Pass checkpoint.resume=auto to continue that run, checkpoint.overwrite=true "
                "to start over and replace them, or choose another trainer.run_dir"
            )
        if damaged and not cfg.checkpoint.overwrite:
            raise UserError(
                f"checkpoint.dir={root} holds saved steps ({', '.join(damaged[-3:])}) but none is "
                "complete (the warnings above say what each lacks): nothing is started over "
                "them. Repair them, name one (checkpoint.resume=PATH says which file is bad), "
                "or pass checkpoint.overwrite=true to start over and remove them"
            )
        _refuse_earlier_metrics(cfg)
        if (steps or damaged) and dist.is_main:
            log.warning(
                "checkpoint.overwrite=true: removing %d checkpoints in %s",
                len(steps or damaged),
                root,
            )
            layout.remove_all(root)
        if cfg.checkpoint.overwrite and dist.is_main:
            _remove_replaced_wandb_runs(Path(cfg.trainer.run_dir))
    if dist.is_main:
        Path(cfg.trainer.run_dir).mkdir(parents=True, exist_ok=True)
    # Rank 0's choice for all (a collective, so also the barrier after its removals): a
    # listing cached per node (NFS) could show a rank another newest step.
    agreed = gather_objects(None if resume_dir is None else str(resume_dir))[0]
    return None if agreed is None else Path(agreed)


def _remove_replaced_wandb_runs(run_dir: Path) -> None:
    """checkpoint.overwrite=true replaces the run: its wandb runs under <run_dir>/wandb go with
    its checkpoints and metrics (`wandb sync <run_dir>/wandb/offline-run-*` uploaded them as
    well, and `make train` piled one up per call)."""
    old = sorted((run_dir / "wandb").glob("*run-*"))
    if old:
        log.warning(
            "checkpoint.overwrite=true: removing the replaced run's %d wandb run(s) in %s",
            len(old),
            run_dir / "wandb",
        )
        for path in old:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _warn_schedule_changes(written: dict, cfg: TrainConfig, step: int) -> None:
    """A resume rebuilds the learning-rate schedule from this run's keys: a changed
    trainer.max_steps (or optim.*) moves the LR at once, and max_steps at or below the
    checkpoint's step trains nothing. Both are said, not left to be found in the metrics."""
    if step >= cfg.trainer.max_steps:
        log.warning(
            "the checkpoint is at step %d and trainer.max_steps=%d: nothing to train; raise "
            "trainer.max_steps to continue",
            step,
            cfg.trainer.max_steps,
        )
    try:
        was_optim = from_dict(type(cfg.optim), written["optim"], "optim")
        was_max = int(written["trainer"]["max_steps"])
    except (KeyError, TypeError, ValueError):  # no run config (an upcycled checkpoint)
        return
    lr = lambda optim, max_steps: optim.lr * optim.lr_factor(step, max_steps)  # noqa: E731
    before, now = lr(was_optim, was_max), lr(cfg.optim, cfg.trainer.max_steps)
    if not math.isclose(before, now, rel_tol=1e-9):
        log.warning(
            "the learning-rate schedule follows this run's trainer.max_steps and optim.* "
            "(the checkpoint's: max_steps %d): the learning rate at step %d is %.3g, where the "
            "checkpoint's schedule had %.3g",
            was_max,
            step + 1,
            now,
            before,
        )


def _warn_micro_batch_change(written: dict, cfg: TrainConfig) -> None:
    """MoE routing that is computed over each micro-batch continues otherwise at another
    micro-batch size (trainer.micro_batch_size=0 follows the world size): said, with the
    size that continues the run as it was."""
    try:
        was = int(written["trainer"]["micro_batch_size"])
    except (KeyError, TypeError, ValueError):
        return
    now, moe = cfg.trainer.micro_batch_size, cfg.moe
    reasons = moe.per_micro_batch_routing() if moe.enabled else []
    if was and was != now and reasons:
        log.warning(
            "the checkpoint trained with micro-batches of %d sequences per rank, this run "
            "takes %d (trainer.micro_batch_size): %s over each micro-batch, so the routing "
            "goes on differently from the checkpoint's run; trainer.micro_batch_size=%d "
            "continues it as it was",
            was,
            now,
            " and ".join(reasons),
            was,
        )


# What the rows a step trains on are made of, beyond the data position (which is checked):
# a resume may change them, and is then told that the data differ from the checkpoint's run.
_ROWS_KEYS = {
    "trainer": ("global_batch_size",),
    "data": (
        "seq_len",
        "whole_documents",
        "pair_order",
        "caption_first_prob",
        "min_image_side",
        "max_aspect_ratio",
    ),
}


def _say_rows_change(written: dict, cfg: TrainConfig) -> None:
    """The keys that make a step's rows and differ from the checkpoint's config: the data
    continue from the same documents, packed or decoded otherwise."""
    changed = []
    for group, keys in _ROWS_KEYS.items():
        saved = written.get(group) if isinstance(written.get(group), dict) else {}
        now = getattr(cfg, group)
        changed += [
            f"{group}.{k}: checkpoint {saved[k]!r}, this run {getattr(now, k)!r}"
            for k in keys
            if k in saved and saved[k] != getattr(now, k)
        ]
    if changed:
        log.info(
            "the resumed data continue from the same documents, but make other rows: %s",
            "; ".join(changed),
        )


def restart_count() -> int:
    """How many times the scheduler has restarted this job: Slurm's requeue (launch/slurm.sbatch,
    Hydra's submitit launcher) or torchrun's --max-restarts; 0 on a first start."""
    counts = (os.environ.get(k, "") for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))
    return max((int(c) for c in counts if c.isdigit()), default=0)


def _refuse_earlier_metrics(cfg: TrainConfig) -> None:
    """A fresh start replaces metrics.jsonl (MetricsLogger): an earlier run's rows, even with
    no checkpoint beside them, are kept unless checkpoint.overwrite=true. resume=auto that
    finds nothing is this run restarting at step 0 (say, preempted before its first
    checkpoint): its rows are cut back like any resume's."""
    rows = Path(cfg.trainer.run_dir) / METRICS_FILE
    if cfg.checkpoint.overwrite:
        return
    if cfg.checkpoint.resume == "auto":
        _refuse_lost_checkpoints(cfg, rows)
        return
    if rows.is_file() and rows.stat().st_size > 0:
        raise UserError(
            f"trainer.run_dir={cfg.trainer.run_dir} already holds {METRICS_FILE} of an earlier "
            "run, which a fresh start would replace. Pass checkpoint.overwrite=true to start "
            "over and replace it, or choose another trainer.run_dir"
        )


def _last_logged_step(rows: Path) -> int:
    """The highest step metrics.jsonl has a row of (0: none)."""
    last = 0
    if rows.is_file():
        for line in rows.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, TypeError, AttributeError):
                continue
    return last


def _refuse_lost_checkpoints(cfg: TrainConfig, rows: Path) -> None:
    """resume=auto found no checkpoint. Rows only before the first save: the run restarts at
    step 0 (preempted before its first checkpoint), said. Rows past a step that saved: its
    checkpoints are elsewhere (another checkpoint.dir) or gone, and restarting would replace
    its metrics: refused."""
    last = _last_logged_step(rows)
    interval = cfg.checkpoint.interval
    if interval and last >= interval:
        raise UserError(
            f"checkpoint.resume=auto: no checkpoint in checkpoint.dir={cfg.checkpoint.dir}, but "
            f"{rows} has rows up to step {last}, past checkpoint.interval={interval}: the run's "
            "checkpoints are elsewhere (give its checkpoint.dir) or gone. Pass "
            "checkpoint.overwrite=true to start over and replace its metrics"
        )
    if last:
        log.warning(
            "checkpoint.resume=auto: no checkpoint in %s; the run restarts at step 0 and its "
            "metrics rows (up to step %d) are replaced",
            cfg.checkpoint.dir,
            last,
        )


def _kernels(model: torch.nn.Module, model_cfg: ModelConfig, device: torch.device) -> dict:
    """The attention kernel and the expert GEMM path this run takes: logged once, and
    recorded in the first row of metrics.jsonl. A forced path that cannot run fails here."""
    facts = {"attention": resolve_backend(model_cfg.attention, device)}
    check_backend(facts["attention"], device, training=True)
    if facts["attention"] == "sdpa" and model_cfg.document_masking:
        # How document masks run (a refusal here, before any step, rather than the math kernel).
        gqa = model_cfg.n_heads != model_cfg.n_kv_heads
        facts["attention/document_mask"] = sdpa_call(device.type, "dense", gqa, model_cfg.head_dim)
    gemm = gemm_paths(model, device)
    if gemm:
        facts["moe/gemm"] = ",".join(sorted(gemm))
        for path, why in gemm.items():
            log.info("expert GEMMs: %s (%s)", path, why)
    log.info("attention: %s (model.attention=%s)", facts["attention"], model_cfg.attention)
    return facts


def _describe(cfg: TrainConfig, model_cfg: ModelConfig, dist: DistInfo) -> None:
    params = model_cfg.num_params(cfg.moe)
    flops = model_cfg.flops_per_token(cfg.data.seq_len, cfg.moe)
    bf16, t = uses_bf16(cfg.trainer.precision, dist.device), cfg.trainer
    stage = optimizer_zero_stage(cfg.parallel.zero_stage, bf16)
    if stage != cfg.parallel.zero_stage:
        log.warning(
            "trainer.precision=bf16 with parallel.zero_stage=0: using DeepSpeed's ZeRO-1 bf16 "
            "optimizer (fp32 master weights, optimizer state sharded over data-parallel ranks)"
        )
    log.info(
        "model: %.2fM parameters (%.2fM embedding; active text %.2fM, image %.2fM), "
        "%.3g training FLOPs/token; world size %d, expert parallel %d, ZeRO-%d, "
        "%s, %s; %d sequences of %d tokens a step (%s tokens; micro-batches of %d, "
        "grad accumulation %d)",
        params["total"] / 1e6,
        params["embedding"] / 1e6,
        params["active"]["text"] / 1e6,
        params["active"]["image"] / 1e6,
        flops["text"],
        dist.world_size,
        cfg.parallel.expert_parallel_size,
        stage,  # the stage that runs
        "bf16" if bf16 else "fp32",
        dist.device,
        t.global_batch_size,
        cfg.data.seq_len,
        f"{t.global_batch_size * cfg.data.seq_len:,}",
        t.micro_batch_size,
        t.grad_accumulation_steps(dist.world_size),
    )
    _warn_short_warmup(cfg)
    _warn_untrained_routers(cfg)
    _warn_rollback_without_checkpoints(cfg)


def _warn_untrained_routers(cfg: TrainConfig) -> None:
    """Auxiliary routers with a zero coefficient are never trained, yet they route every
    token outside training (evaluation, sampling): said, not found in a poor eval/loss."""
    untrained = []
    if cfg.moe.enabled and cfg.moe.router == "expert_choice" and not cfg.moe.aux_router_coef:
        untrained.append("moe.aux_router_coef=0: expert choice's")
    if cfg.model.mod.layers and not cfg.model.mod.aux_router_coef:
        untrained.append("model.mod.aux_router_coef=0: mixture-of-depths'")
    for what in untrained:
        log.warning(
            "%s auxiliary routers are not trained, and they make the routing decisions of "
            "evaluation (eval/loss) and sampling (mm_moe.generate)",
            what,
        )


def _warn_rollback_without_checkpoints(cfg: TrainConfig) -> None:
    """Said at the start, not found at the first spike of a long run."""
    spike = cfg.trainer.spike
    if spike.action == "rollback" and spike.window and not cfg.checkpoint.interval:
        log.warning(
            "trainer.spike.action=rollback with checkpoint.interval=0: no checkpoint is "
            "written to roll back to, so a spike's update is only skipped"
        )


def _warn_short_warmup(cfg: TrainConfig) -> None:
    """A warmup longer than the run: the peak learning rate is never reached."""
    optim, max_steps = cfg.optim, cfg.trainer.max_steps
    if optim.warmup_steps > max_steps:
        log.warning(
            "optim.warmup_steps=%d is beyond trainer.max_steps=%d: the learning rate only "
            "warms up, to %.3g of optim.lr=%g at the last step, with no decay",
            optim.warmup_steps,
            max_steps,
            optim.lr_factor(max_steps - 1, max_steps),
            optim.lr,
        )


def _wandb_mode(configured: str) -> str:
    """logging.wandb.mode, or the mode the environment's WANDB_MODE sets (cluster scripts set
    it, and wandb's own hints say to): passed to wandb.init, the key alone would override it.
    Disabled by either is disabled."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = {"dryrun": "offline", "run": "online"}.get(env, env)
    if configured == "disabled" or env not in ("online", "offline", "disabled"):
        return configured
    if env != configured:
        log.info("WANDB_MODE=%s (environment) overrides logging.wandb.mode=%s", env, configured)
    return env


def _wandb_init(cfg: TrainConfig, config_dict: dict, meta: dict) -> dict | None:
    """wandb.init's arguments: the run id the checkpoint recorded (a resume continues its wandb
    run), or a new one where the resume goes back behind what that run logged (a resume from
    an earlier step): wandb drops the steps a run has logged already, so the new line would
    not show there."""
    mode = _wandb_mode(cfg.logging.wandb.mode)
    if mode == "disabled":
        return None
    run_id = meta.get("wandb_id")
    logged = _last_logged_step(Path(cfg.trainer.run_dir) / METRICS_FILE)
    if run_id and logged > meta["step"]:
        log.warning(
            "resuming at step %d, behind wandb run %s, which logged up to step %d and drops "
            "the steps it has: this line logs to a new wandb run",
            meta["step"],
            run_id,
            logged,
        )
        run_id = None
    return {
        "project": cfg.logging.wandb.project,
        "entity": cfg.logging.wandb.entity,
        "name": cfg.logging.wandb.name or cfg.name,
        "tags": cfg.logging.wandb.tags,
        "mode": mode,
        "dir": str(cfg.trainer.run_dir),
        "config": config_dict,
        "id": run_id or secrets.token_hex(4),
        "resume": "allow",
    }


def _flops_meter(cfg: TrainConfig, model_cfg, dist: DistInfo, cumulative) -> FlopsMeter:
    return FlopsMeter(
        model_cfg.flops_per_token(cfg.data.seq_len, cfg.moe),
        cumulative,
        (model_cfg, cfg.moe, cfg.data.seq_len),
        # FlexAttention skips the blocks a document mask hides; SDPA computes them.
        skips_masked=model_cfg.document_masking
        and resolve_backend(model_cfg.attention, dist.device) == "flex",
    )


def _evaluator(cfg: TrainConfig, dist: DistInfo, held_micro: int) -> HeldoutEval | None:
    """Held-out evaluation on every rank: under expert parallelism eval forwards are
    collective. `held_micro`: the held-out set's micro-batch size at world size 1 (the
    configured trainer.micro_batch_for(1)), which makes it the same set at any world size."""
    if not cfg.eval.interval:
        return None
    batches = heldout_batches(
        cfg.eval,
        cfg.data,
        cfg.tokenizer,
        dist.rank,
        dist.world_size,
        cfg.trainer.micro_batch_size,
        held_micro,
    )
    return HeldoutEval(batches, dist.device)


def _lock_run_dir(cfg: TrainConfig, dist: DistInfo) -> list[Path] | None:
    """The run folder's lock (rank 0), taken before anything reads or replaces the folder's
    checkpoints and metrics (trainer/run_lock.py)."""
    check_folders(cfg)
    if not dist.is_main:
        return None
    run_dir, ckpt_dir = Path(cfg.trainer.run_dir), Path(cfg.checkpoint.dir)
    keys = [run_lock.acquire(run_dir)]
    try:  # also inside the run folder: another run may name it as its checkpoint.dir
        keys.append(run_lock.acquire(ckpt_dir, "checkpoint.dir"))
    except UserError:
        run_lock.release(keys)
        raise
    return keys


def _resume(resume_dir, cfg: TrainConfig, dist: DistInfo, engine, loader, guard, digest) -> dict:
    """The checkpoint's meta after loading it into the run's parts ({"step": 0} without one),
    its tokenizer checked against the run's first."""
    if resume_dir is None:
        return {"step": 0}
    recorded = layout.read_meta(resume_dir).get("tokenizer_digest")
    check_tokenizer(recorded, cfg.tokenizer, f"checkpoint {resume_dir}", digest)
    own = _own(Path(cfg.checkpoint.dir), resume_dir)
    weights_only = cfg.checkpoint.weights_only and not own
    meta = ckpt_state.load(resume_dir, engine, loader, dist.rank, dist.world_size, weights_only)
    guard.load_state_dict(meta)
    log.info("resumed from %s at step %d", resume_dir, meta["step"])
    newer = layout.newer_steps(Path(cfg.checkpoint.dir), meta["step"]) if own else []
    if newer and dist.is_main:
        log.warning(
            "%s holds steps after the resumed step %d (%s): a line of this run from before "
            "this resume (or a save the run stopped on before moving `latest` to it: "
            "checkpoint.resume=PATH takes it). They stay as they are, outside "
            "checkpoint.keep_last; this run's saves "
            "replace those of the same step, and `latest` names this run's newest. Remove them "
            "when they are no longer needed",
            cfg.checkpoint.dir,
            meta["step"],
            ", ".join(layout.step_dir_name(s) for s in newer),
        )
    if not meta.get("weights_only") and dist.is_main:  # the same on every rank: said once
        # The checkpoint's config as its run wrote it ({}: none, an upcycled checkpoint's)
        written = layout.read_config(resume_dir, required=False) or {}
        _warn_schedule_changes(written, cfg, meta["step"])
        _warn_micro_batch_change(written, cfg)
        _say_rows_change(written, cfg)
    return meta


def _engine(cfg: TrainConfig, model_cfg, dist):
    """The model, built and parallelized (said first where its state will not fit on a CPU)."""
    model = model_cfg.build(cfg.moe)
    warn_if_beyond_host_memory(model, dist.device)
    return parallelize(model.to(dist.device), cfg, dist)


def build_training(cfg: TrainConfig) -> Training:
    """Every part of the run; resumes when checkpoint.resume says so. Collective."""
    held_micro = cfg.trainer.micro_batch_for(1)  # the held-out set's, as one process reads it
    cfg, dist = start_processes(cfg)
    lock = _lock_run_dir(cfg, dist)
    try:
        return _build(cfg, dist, lock, held_micro)
    except BaseException:
        run_lock.release(lock, tidy=True)  # a failed start leaves no empty run folder
        raise


def _build(cfg: TrainConfig, dist: DistInfo, lock, held_micro: int) -> Training:
    resume_dir = _resume_dir(cfg, dist)
    seed_all(cfg.trainer.seed)  # same initial weights on every rank
    t = cfg.trainer
    loader = cfg.data.build(
        t.seed, dist.rank, dist.world_size, t.micro_batch_size, t.global_batch_size
    )
    # The next step's batches are built while this one runs (pinned for async copies on CUDA).
    loader = Prefetcher(loader, pin_memory=dist.device.type == "cuda", device=dist.device)
    if resume_dir is not None:  # before the sizes are compared: the layout says more
        ckpt_state.check_vocabulary(resume_dir, loader.vocab)
    model_cfg = cfg.model.with_vocab(loader.vocab.size)
    engine = _engine(cfg, model_cfg, dist)
    seed_all(t.seed * 100_003 + dist.rank)  # randomness in training differs across ranks
    config_dict = scrub(to_dict(cfg))  # secrets never reach the saved config or wandb
    config_dict["model"]["vocab_size"] = model_cfg.vocab_size
    guard = StepGuard(t)  # non-finite steps and loss spikes
    digest = tokenizer_digest(cfg.tokenizer)
    meta = _resume(resume_dir, cfg, dist, engine, loader, guard, digest)
    if dist.is_main:
        _describe(cfg, model_cfg, dist)
    wandb_init = _wandb_init(cfg, config_dict, meta) if dist.is_main else None
    training = Training(
        cfg=cfg,
        dist=dist,
        model_cfg=model_cfg,
        engine=engine,
        loader=loader,
        guard=guard,
        checkpointer=Checkpointer(cfg.checkpoint, dist.device),
        metrics=MetricsLogger(
            Path(t.run_dir),
            dist.is_main,
            t.max_steps,
            meta["step"],
            cfg.logging,
            wandb_init,
            lock=lock,
        ),
        flops=_flops_meter(cfg, model_cfg, dist, meta.get("flops_cumulative")),
        evaluator=_evaluator(cfg, dist, held_micro),
        config_dict=config_dict,
        start_step=meta["step"],
        # Kept through a resume with wandb off: the next one with wandb on continues the run.
        wandb_id=wandb_init["id"] if wandb_init else meta.get("wandb_id"),
        peak_flops=peak_flops(device_name(dist.device), t.peak_tflops),
        facts=_kernels(engine.module, model_cfg, dist.device),
        tokenizer_digest=digest,
    )
    fault_injection.install(training)  # test-only; nothing unless MM_MOE_FAULT_INJECT is set
    return training
