"""The training run: build every part from the validated config, resume, loop, checkpoint."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from mm_moe.checkpoint import layout
from mm_moe.checkpoint import state as ckpt_state
from mm_moe.checkpoint.async_save import Checkpointer
from mm_moe.checkpoint.rng import seed_all
from mm_moe.config.schema import TrainConfig
from mm_moe.config.validate import to_dict
from mm_moe.errors import UserError
from mm_moe.eval.flops import FlopsMeter
from mm_moe.eval.heldout import HeldoutEval, heldout_batches
from mm_moe.model.attention_mask import check_backend, resolve_backend
from mm_moe.model.moe.experts import gemm_paths
from mm_moe.parallel.compile import compile_blocks
from mm_moe.parallel.distributed import (
    DistInfo,
    adopt_slurm_env,
    all_reduce_sum,
    barrier,
    init_distributed,
    names_lost_ranks,
)
from mm_moe.parallel.engine import build_engine, deepspeed_config
from mm_moe.parallel.expert_parallel import (
    check_expert_parallel,
    parallelize,
    split_moe_param_groups,
)
from mm_moe.trainer.guard import StepGuard
from mm_moe.trainer.metrics import MetricsLogger
from mm_moe.trainer.preemption import PreemptionFlag
from mm_moe.trainer.rollback import rollback
from mm_moe.trainer.scrub import install_log_scrubber, scrub
from mm_moe.trainer.step import train_step

log = logging.getLogger("mm_moe")

# Dense bf16 peak FLOP/s per device, for MFU.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def _peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    if cfg.trainer.peak_flops:
        return cfg.trainer.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in _PEAK_FLOPS.items():
            if key in name:
                return flops
    return 0.0


def _check_fresh_start(cfg: TrainConfig, ckpt_root: Path, is_main: bool) -> None:
    steps = layout.complete_steps(ckpt_root)
    if steps and cfg.checkpoint.overwrite:
        if is_main:
            log.warning(
                "checkpoint.overwrite=true: removing %d checkpoints in %s", len(steps), ckpt_root
            )
            layout.remove_all(ckpt_root)
    elif steps:
        raise UserError(
            f"checkpoint.dir={ckpt_root} already holds checkpoints (latest step {steps[-1]}). "
            "Pass checkpoint.resume=auto to continue that run, checkpoint.overwrite=true to "
            "start over and replace them, or choose another trainer.run_dir"
        )


def _wandb_init(cfg: TrainConfig, run_dir: Path, config_dict: dict, run_id: str | None):
    if cfg.logging.wandb.mode == "disabled":
        return None
    import secrets

    return {
        "project": cfg.logging.wandb.project,
        "entity": cfg.logging.wandb.entity,
        "name": cfg.logging.wandb.name or cfg.name,
        "tags": cfg.logging.wandb.tags,
        "mode": cfg.logging.wandb.mode,
        "dir": str(run_dir),
        "config": config_dict,
        "id": run_id or secrets.token_hex(4),
        "resume": "allow",
    }


def _data_counters(loader, device: torch.device) -> dict:
    """The loader's running counters (e.g. `data/skipped_<reason>`), summed over ranks.

    Loaders expose `counters() -> dict[str, int]` with the same keys on every rank."""
    if not hasattr(loader, "counters"):
        return {}
    local = loader.counters()
    keys = sorted(local)
    if not keys:
        return {}
    totals = all_reduce_sum(
        torch.tensor([local[k] for k in keys], dtype=torch.float64, device=device)
    )
    return {k: int(v) for k, v in zip(keys, totals.tolist())}


def _kernels(model: torch.nn.Module, model_cfg, device: torch.device) -> dict[str, str]:
    """The attention kernel and the expert GEMM path this run takes: logged once, and
    recorded in the first row of metrics.jsonl."""
    facts = {"attention": resolve_backend(model_cfg.attention, device)}
    check_backend(facts["attention"], device, training=True)
    gemm = gemm_paths(model, device)
    if gemm:
        facts["moe/gemm"] = ",".join(sorted(gemm))
        for path, why in gemm.items():
            log.info("expert GEMMs: %s (%s)", path, why)
    log.info("attention: %s (model.attention=%s)", facts["attention"], model_cfg.attention)
    return facts


@names_lost_ranks
def run(cfg: TrainConfig) -> list[dict]:
    """Train; returns the logged metrics (rank 0's view, identical on every rank)."""
    install_log_scrubber()
    adopt_slurm_env()  # one Slurm task per process (submitit): before the world-size checks
    cfg = cfg.for_world(int(os.environ.get("WORLD_SIZE", 1)))
    check_expert_parallel(cfg.parallel, cfg.moe, int(os.environ.get("WORLD_SIZE", 1)))
    dist_info: DistInfo = init_distributed(
        cfg.parallel.backend, cfg.parallel.timeout_s, cfg.trainer.device
    )
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    dp_world = dist_info.world_size
    cfg.trainer.grad_accumulation_steps(dp_world)  # validates divisibility
    use_bf16 = cfg.trainer.precision == "bf16" or (
        cfg.trainer.precision == "auto" and dist_info.device.type == "cuda"
    )

    run_dir = Path(cfg.trainer.run_dir)
    ckpt_root = Path(cfg.checkpoint.dir)
    resume_dir = layout.resolve_resume(cfg.checkpoint.resume, ckpt_root)
    # Starting from nothing, or from another run's (or an upcycled) checkpoint, begins a new
    # line of checkpoints in checkpoint.dir: never on top of an existing one unasked.
    if resume_dir is None or ckpt_root.resolve() not in resume_dir.resolve().parents:
        _check_fresh_start(cfg, ckpt_root, dist_info.is_main)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()

    seed_all(cfg.trainer.seed)  # same initial weights on every rank
    loader = cfg.data.build(
        cfg.trainer.seed,
        dist_info.rank,
        dp_world,
        cfg.trainer.micro_batch_size,
        cfg.trainer.global_batch_size,
    )
    model_cfg = cfg.model.with_vocab(loader.vocab.size)
    model = model_cfg.build(cfg.moe).to(dist_info.device)
    # Expert parallelism: shard the experts, exchange tokens by all-to-all (None at EP=1).
    expert_parallel = parallelize(model, cfg.parallel, dist_info.device)
    if cfg.trainer.compile:
        compile_blocks(model)
    optimizer = cfg.optim.build(model)
    if expert_parallel is not None:
        split_moe_param_groups(optimizer)
    scheduler = cfg.optim.build_schedule(optimizer, cfg.trainer.max_steps)
    ds_config = deepspeed_config(
        global_batch_size=cfg.trainer.global_batch_size,
        micro_batch_size=cfg.trainer.micro_batch_size,
        dp_world_size=dp_world,
        zero_stage=cfg.parallel.zero_stage,
        grad_clip=cfg.optim.grad_clip,
        bf16=use_bf16,
    )
    engine = build_engine(model, optimizer, scheduler, ds_config)
    # Seed per rank after init so any randomness in training differs across ranks.
    seed_all(cfg.trainer.seed * 100_003 + dist_info.rank)

    config_dict = scrub(to_dict(cfg))  # secrets never reach the saved config or wandb
    config_dict["model"]["vocab_size"] = model_cfg.vocab_size
    start_step, wandb_id, flops_state = 0, None, None
    guard = StepGuard(cfg.trainer)  # non-finite steps and loss spikes
    checkpointer = Checkpointer(cfg.checkpoint, dist_info.device)
    if resume_dir is not None:
        meta = ckpt_state.load(resume_dir, engine, scheduler, loader, dist_info.rank, dp_world)
        start_step, wandb_id = meta["step"], meta.get("wandb_id")
        guard.load_state_dict(meta)
        flops_state = meta.get("flops_cumulative")
        log.info("resumed from %s at step %d", resume_dir, start_step)

    params = model_cfg.num_params(cfg.moe)
    flops = model_cfg.flops_per_token(cfg.data.seq_len, cfg.moe)
    if dist_info.is_main:
        log.info(
            "model: %.2fM parameters (%.2fM embedding; active text %.2fM, image %.2fM), "
            "%.3g training FLOPs/token; "
            "world size %d, expert parallel %d, ZeRO-%d, grad accumulation %d, %s, %s",
            params["total"] / 1e6,
            params["embedding"] / 1e6,
            params["active"]["text"] / 1e6,
            params["active"]["image"] / 1e6,
            flops["text"],
            dp_world,
            cfg.parallel.expert_parallel_size,
            cfg.parallel.zero_stage,
            cfg.trainer.grad_accumulation_steps(dp_world),
            "bf16" if use_bf16 else "fp32",
            dist_info.device,
        )
    wandb_init = _wandb_init(cfg, run_dir, config_dict, wandb_id) if dist_info.is_main else None
    metrics = MetricsLogger(
        run_dir, dist_info.is_main, cfg.trainer.max_steps, start_step, cfg.logging, wandb_init
    )
    metrics.first_row = _kernels(engine.module, model_cfg, dist_info.device)
    wandb_id = wandb_init["id"] if wandb_init else None
    peak = _peak_flops(cfg, dist_info.device)
    tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
    mean_flops = sum(flops.values()) / len(flops)
    flops_meter = FlopsMeter(flops, flops_state, (model_cfg, cfg.moe, cfg.data.seq_len))
    heldout = None
    if cfg.eval.interval:  # every rank: under expert parallelism eval forwards are collective
        heldout = HeldoutEval(
            heldout_batches(
                cfg.eval,
                cfg.data,
                cfg.tokenizer,
                dist_info.rank,
                dp_world,
                cfg.trainer.micro_batch_size,
            ),
            dist_info.device,
        )

    history = []
    preemption = PreemptionFlag()
    for step in range(start_step + 1, cfg.trainer.max_steps + 1):
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        batches = guard.next_batches(loader, step)
        stats = train_step(
            engine, batches, model_cfg.z_loss, dp_world, dist_info.device, guard=guard, step=step
        )
        if dist_info.device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        record = {
            "step": step,
            **stats,
            "lr": lr,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_step / step_time,
        }
        record.update(_data_counters(loader, dist_info.device))
        record.update(guard.counters(), **checkpointer.counters())
        record.update(flops_meter.update(stats))
        evaluated = heldout is not None and (
            step % cfg.eval.interval == 0 or step == cfg.trainer.max_steps
        )
        if evaluated:
            record.update(heldout(engine.module))
        if peak:
            record["mfu"] = mean_flops * record["tokens_per_s"] / (peak * dp_world)
        history.append(record)
        if evaluated or step % cfg.trainer.log_interval == 0 or step == cfg.trainer.max_steps:
            metrics.log(record)
        if guard.last_action == "rollback":
            parts = (engine, scheduler, loader, dist_info.rank, dp_world)
            rollback(guard, checkpointer, ckpt_root, step, *parts)
        interval = cfg.checkpoint.interval
        preempted = preemption.agreed(all_reduce_sum, dist_info.device)
        if preempted or (interval and (step % interval == 0 or step == cfg.trainer.max_steps)):
            checkpointer.save(
                ckpt_root,
                step,
                engine,
                scheduler,
                loader,
                config_dict,
                dist_info.rank,
                dp_world,
                cfg.checkpoint.keep_last,
                extra={
                    "wandb_id": wandb_id,
                    "flops_cumulative": flops_meter.state_dict(),
                    **guard.state_dict(),
                },
            )
        if preempted:
            log.warning(
                "%s received: checkpoint of step %d written, exiting",
                preemption.signal_name or "a preemption signal on another rank",
                step,
            )
            break
    checkpointer.close()  # an asynchronous write in flight ends (and its error shows) here
    preemption.restore_defaults()
    metrics.close()
    if dist_info.is_main and history:
        _summary(
            history, run_dir, ckpt_root if cfg.checkpoint.interval else None, cfg.logging.wandb.mode
        )
    return history


def _summary(history: list[dict], run_dir: Path, ckpt_root: Path | None, wandb_mode: str):
    first, last = history[0], history[-1]
    tok_s = sum(r["tokens_per_s"] for r in history) / len(history)
    lines = [
        f"done: {last['step']} steps; loss {first['loss']:.3f} -> {last['loss']:.3f} "
        f"(text {first['loss_text']:.3f} -> {last['loss_text']:.3f}, "
        f"image {first['loss_image']:.3f} -> {last['loss_image']:.3f}); {tok_s:.0f} tokens/s",
        f"metrics: {run_dir / 'metrics.jsonl'}",
    ]
    if ckpt_root is not None:
        lines.append(f"checkpoints: {ckpt_root} (latest: {layout.latest_step_dir(ckpt_root)})")
    if wandb_mode != "disabled":
        lines.append(f"wandb ({wandb_mode}): {run_dir / 'wandb'}")
    for line in lines:
        log.info(line)
