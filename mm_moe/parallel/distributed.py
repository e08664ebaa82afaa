"""Process-group start-up, under torchrun/slurm or as a single plain process, and liveness:
a lost rank ends the job with an error that names it instead of hanging it.

Every collective has `parallel.timeout_s`. On top of that each rank heartbeats through the
rendezvous store (a counter, once a second, from a thread: `Liveness`). When a collective fails
(gloo reports a dead peer at once), `names_lost_ranks` looks at the heartbeats and raises
`RankLostError` naming the ranks that stopped. When nothing fails but a rank's heartbeat stops
for `lost_after` seconds (half the timeout, 10 to 60 s; a rank stuck in a collective that waits
on it, e.g. an all-to-all, raises nothing), the monitor ends the process itself, naming it.
Rank 0 watches every rank, the others watch rank 0 and rank 0's verdict, so the store sees
O(ranks) operations a second. A rank that ends normally or with its own error marks itself
first, so it is never taken for lost.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mm_moe.errors import UserError
from mm_moe.parallel.deepspeed_fixes import forget_process_groups, skip_shm_build
from mm_moe.utils.cuda_check import cuda_missing
from mm_moe.utils.host_to_device import host_to_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(environ: dict) -> dict:
    """torch.distributed's variables from Slurm's, for launches with one Slurm task per process
    and no torchrun (srun, Hydra's submitit launcher); empty when they do not apply."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    if int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    nodelist = environ.get("SLURM_JOB_NODELIST", "")
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        hosts = []
    master = hosts[0] if hosts else environ.get("SLURMD_NODENAME", "127.0.0.1")
    job = int(environ.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR", master),
        "MASTER_PORT": environ.get("MASTER_PORT", str(20000 + job % 20000)),
    }


_FROM_SLURM = False  # this process's RANK/WORLD_SIZE were taken from Slurm's variables


def adopt_slurm_env() -> bool:
    """torch.distributed's variables from Slurm's (`slurm_env`); True where they were taken
    (by this call or an earlier one)."""
    global _FROM_SLURM
    env = slurm_env(dict(os.environ))
    if env:
        _FROM_SLURM = True
        log.info(
            "rank %s of %s from Slurm's SLURM_PROCID/SLURM_NTASKS (no torchrun); rendezvous at "
            "%s:%s",
            env["RANK"],
            env["WORLD_SIZE"],
            env["MASTER_ADDR"],
            env["MASTER_PORT"],
        )
    os.environ.update(env)
    return _FROM_SLURM


def _rendezvous_failed(exc: Exception, from_slurm: bool, timeout_s: int) -> UserError:
    """The process group did not form (a rank never came): say where this rank's place in the
    world came from, and how ranks are started."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if from_slurm:
        how = (
            f"this process took rank {rank} of {world} from Slurm's SLURM_PROCID/SLURM_NTASKS "
            "(no torchrun): start one process per task with srun (as launch/slurm.sbatch "
            "does), or run a single process with SLURM_NTASKS unset or 1"
        )
    else:
        how = (
            f"this process is rank {rank} of {world} (RANK/WORLD_SIZE): start every rank "
            "(torchrun --nnodes/--nproc_per_node) with the same MASTER_ADDR:MASTER_PORT"
        )
    return UserError(
        f"the process group did not form at {where} within parallel.timeout_s={timeout_s} "
        f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): {how}"
    )


def end_with_launcher() -> None:
    """A torchrun worker asks the kernel for SIGTERM when its agent dies (kill -9 of torchrun,
    the OOM killer): the preemption handler then checkpoints and ends it. Without this the
    workers trained on as orphans (the agent's store gone, its errors every half second), and
    the run folder's lock refused a relaunch until they ended. Linux only."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError) as exc:
        log.warning("cannot ask for a signal when torchrun's agent dies (%s)", exc)
        return
    if os.getppid() != parent:  # the agent died before the request: act on it now
        os.kill(os.getpid(), signal.SIGTERM)


def init_distributed(backend: str, timeout_s: int, device: str = "auto") -> DistInfo:
    """Start (or join) the default process group; one plain process gets a world of one."""
    from_slurm = adopt_slurm_env()
    if "RANK" not in os.environ:  # not launched by torchrun: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    end_with_launcher()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and (why := cuda_missing()):
        raise UserError(f"trainer.device=cuda: {why}; use trainer.device=cpu or auto")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise UserError("parallel.backend=nccl needs CUDA; use parallel.backend=gloo on CPU")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise UserError(
            f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()} "
            "GPU(s); launch at most that many processes per node (torchrun --nproc_per_node, "
            "make train NPROC=...), or train on CPU with trainer.device=cpu"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    skip_shm_build()
    if not dist.is_initialized():
        import deepspeed

        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
                _init_restarted_attempt(backend, timeout)
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # wraps the group
        except dist.DistStoreError as exc:
            raise _rendezvous_failed(exc, from_slurm, timeout_s) from exc
    else:  # a process group made by the caller (tests, notebooks): DeepSpeed wraps it too
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())
    global _LIVENESS
    if _LIVENESS is None and dist.get_world_size() > 1:
        try:
            _LIVENESS = Liveness(dist.get_rank(), dist.get_world_size(), timeout_s)
        except (RuntimeError, OSError, KeyError) as exc:  # the collective timeout still holds
            log.warning("no rank heartbeats (cannot reach the rendezvous store): %s", exc)
        # Every rank's first heartbeat is in the store before anyone reads (and a rank without
        # one is never read: all_reduce says whether every rank has one).
        ok = torch.tensor([0.0 if _LIVENESS is None else 1.0], device=dev)
        dist.all_reduce(ok)
        if int(ok.item()) != dist.get_world_size() and _LIVENESS is not None:
            _LIVENESS.mark_exit(ok=True)
            _LIVENESS = None
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def _init_restarted_attempt(backend: str, timeout: datetime.timedelta) -> None:
    """A torchrun restart (--max-restarts): torchrun --standalone keeps its store across
    attempts, and torch's env:// rendezvous does not prefix the group's keys by attempt there,
    so a new gloo group would read the dead attempt's addresses and fail to connect. Give each
    attempt its own key prefix."""
    restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout,
        wait_for_workers=False,
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"mm_moe/attempt_{restart}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _on_host(value, device: torch.device) -> bool:
    """A value the host holds (a number, or a CPU tensor in an accelerator run)."""
    if not isinstance(value, torch.Tensor):
        return True
    return value.device.type == "cpu" and device.type != "cpu"


def flatten_fp64(values: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    """One flat fp64 tensor on `device` holding every value, and {name: (offset, shape)}.
    Device tensors join with one cat; host values with one copy (pinned, non-blocking), not
    one copy per scalar."""
    on_device, on_host = [], []
    for name in sorted(values):
        (on_host if _on_host(values[name], device) else on_device).append(name)
    parts, layout, offset = [], {}, 0
    for name in on_device:
        t = values[name]
        parts.append(t.detach().reshape(-1).to(torch.float64))
        layout[name], offset = (offset, t.shape), offset + t.numel()
    host: list[float] = []
    for name in on_host:
        value = values[name]
        if isinstance(value, torch.Tensor):
            host += value.reshape(-1).tolist()  # host memory: no device sync
            shape = value.shape
        else:  # a number: no tensor of its own
            host.append(value)
            shape = torch.Size()
        layout[name], offset = (offset, shape), offset + shape.numel()
    if host:
        parts.append(host_to_device(host, device, torch.float64))
    if not parts:
        return torch.zeros(0, dtype=torch.float64, device=device), layout
    return (torch.cat(parts) if len(parts) > 1 else parts[0]), layout


def all_reduce_sum_to_host(values: dict, device: torch.device) -> dict[str, list[float]]:
    """Each value summed over ranks and fetched to the host as a flat list: one all-reduce
    and one device-to-host copy for all of them (sliced on the host). A single process
    whose values are all on the host moves nothing."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 and all(_on_host(v, device) or device.type == "cpu" for v in values.values()):
        device = torch.device("cpu")
    flat, layout = flatten_fp64(values, device)
    host = all_reduce_sum(flat).tolist() if flat.numel() else []  # the one copy
    return {n: host[o : o + math.prod(shape)] for n, (o, shape) in layout.items()}


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable, small), in rank order; [obj] without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    global _LIVENESS
    if _LIVENESS is not None:
        _LIVENESS.mark_exit(ok=sys.exc_info()[0] is None)
        _LIVENESS = None
    mpu = sys.modules.get("megatron.core.parallel_state")  # imported only for expert parallelism
    if mpu is not None and mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
        forget_process_groups()


log = logging.getLogger("mm_moe")
EXIT_RANK_LOST = 1


class RankLostError(RuntimeError):
    """A rank died or stopped responding; the message names it, and where this rank waited
    (no traceback: gloo's and NCCL's own chain says less than that)."""

    brief = True


def _waiting_in(exc: BaseException) -> str:
    """Where the failed call was: its innermost frame, and the project's frame that made it."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    ours = [f for f in frames if f"{os.sep}mm_moe{os.sep}" in f.filename]
    inner = frames[-1]
    where = f"{inner.name} ({Path(inner.filename).name}:{inner.lineno})"
    if ours and ours[-1] is not inner:
        caller = ours[-1]
        where += f", called from {caller.name} ({Path(caller.filename).name}:{caller.lineno})"
    return f" This rank was waiting in {where}."


class Liveness:
    """Heartbeats of every rank through the rendezvous store (see the module docstring)."""

    interval_s = 1.0

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size = rank, world_size
        self.lost_after_s = min(max(timeout_s / 2, 10.0), 60.0)
        self.address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        # A torchrun restart starts a new attempt in the same (agent's) store.
        self.prefix = f"mm_moe/liveness/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=10),
            wait_for_workers=False,
        )
        self.lock = threading.Lock()  # the monitor thread and the main thread share the client
        self.beats = 0
        self.lost: list[int] | None = None
        self.main_is_handling = False
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="mm_moe-liveness", daemon=True)
        self._thread.start()
        # A process that ends without shutdown() (a script's own exit, a test harness) must
        # not finalize with the thread inside a store call: see _stop_thread.
        atexit.register(self._stop_thread)

    def _key(self, what: str, rank: int) -> str:
        return f"{self.prefix}{what}/{rank}"

    def _beat(self) -> None:
        self.beats += 1
        with self.lock:
            self.store.set(self._key("beat", self.rank), str(self.beats))

    def _read(self, ranks: list[int]) -> list[bytes]:
        with self.lock:
            return self.store.multi_get([self._key("beat", r) for r in ranks])

    def _exited(self, rank: int) -> str | None:
        with self.lock:
            key = self._key("exit", rank)
            return self.store.get(key).decode() if self.store.check([key]) else None

    def _watched(self) -> list[int]:
        ranks = range(self.world_size) if self.rank == 0 else [0]
        return [r for r in ranks if r != self.rank]

    def _run(self) -> None:
        watched, seen = self._watched(), {}
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                now = time.monotonic()
                stale = []
                for r, value in zip(watched, self._read(watched)):
                    if seen.get(r, (None,))[0] != value:
                        seen[r] = (value, now)
                    elif now - seen[r][1] > self.lost_after_s and self._exited(r) is None:
                        stale.append(r)
                verdict = self.prefix + "lost"
                if stale and self.rank == 0:
                    with self.lock:
                        self.store.set(verdict, ",".join(map(str, stale)))
                elif not stale and self.rank != 0:
                    with self.lock:
                        if self.store.check([verdict]):
                            stale = [int(r) for r in self.store.get(verdict).decode().split(",")]
            except Exception:  # noqa: BLE001 - the store's host is gone: the main thread's
                continue  # next collective fails, and names_lost_ranks says so
            if stale:
                self._declare(stale)
                return

    def _declare(self, lost: list[int]) -> None:
        """No heartbeat from `lost` for lost_after_s: this rank cannot go on. The main thread
        may be blocked in a collective waiting on them; give it a moment to fail by itself
        (then names_lost_ranks raises), else end the process here."""
        self.lost = lost
        message = self._lost_message(lost, self.lost_after_s)
        log.error("%s; exiting", message)
        time.sleep(2 * self.interval_s)
        if self.main_is_handling:
            return
        print(f"mm_moe: {message}; exiting with status {EXIT_RANK_LOST}", file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(EXIT_RANK_LOST)

    def _lost_message(self, lost: list[int], silent_s: float) -> str:
        ranks = ", ".join(map(str, lost))
        return f"lost rank {ranks}: no heartbeat for {silent_s:.0f} s (the process died or hangs)"

    def diagnose(self) -> str | None:
        """After a collective failed on this rank: which ranks are gone? Watches every
        rank's heartbeat for a few intervals; None when all are alive and running."""
        self.main_is_handling = True
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            first, start = self._read(others), time.monotonic()
            while self.lost is None and time.monotonic() - start < 3 * self.interval_s + 0.5:
                time.sleep(0.25)
            if self.lost is not None:
                return self._lost_message(self.lost, self.lost_after_s)
            silent = [r for r, a, b in zip(others, first, self._read(others)) if a == b]
            exits = {r: self._exited(r) for r in silent}
        except Exception as exc:  # noqa: BLE001
            host = "the torchrun agent" if os.environ.get("TORCHELASTIC_RUN_ID") else "rank 0"
            return (
                f"lost contact with the rendezvous store at {self.address}, hosted by {host}: "
                f"{host} is gone ({exc.__class__.__name__})"
            )
        parts = []
        lost = [r for r in silent if exits[r] is None]
        if lost:
            parts.append(self._lost_message(lost, time.monotonic() - start))
        failed = [r for r in silent if exits[r] == "error"]
        if failed:
            parts.append(f"rank {', '.join(map(str, failed))} {ERRORED}")
        return "; ".join(parts) or None

    def mark_exit(self, ok: bool) -> None:
        """This rank ends (normally or by its own error): never take it for lost."""
        self._stop.set()
        try:
            with self.lock:
                self.store.set(self._key("exit", self.rank), "ok" if ok else "error")
        except Exception:  # noqa: BLE001 - the store may be gone already; nothing to tell
            pass
        self._stop_thread()
        atexit.unregister(self._stop_thread)  # drop the reference to this monitor and store

    def _stop_thread(self) -> None:
        """A daemon thread still inside a C++ store call when the interpreter finalizes is
        force-unwound, which aborts the process ("terminate called without an active
        exception") after a successful run: let it leave its loop first. Runs at mark_exit and
        at interpreter exit (atexit runs before daemon threads are stopped)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.store.timeout.total_seconds() + self.interval_s)


_LIVENESS: Liveness | None = None  # one per process, like the default process group
ERRORED = "stopped with an error (see its log)"


def names_lost_ranks(fn):
    """Decorate the training entry: a failure of a collective because a rank died (or stopped
    with an error) becomes a RankLostError naming that rank."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            live = _LIVENESS
            # UserError: this rank's own user error; `agreed`: every rank raises it together.
            if live is None or isinstance(exc, UserError) or getattr(exc, "agreed", False):
                raise
            verdict = live.diagnose()
            live.mark_exit(ok=False)
            if verdict is None:
                raise
            # A rank gone (killed, its node lost) is what a restart mends; a rank's own error
            # (bad data under data.on_error=raise, a full disk) would stop the restart again.
            errored = verdict.endswith(ERRORED) and ";" not in verdict
            hint = (
                " That error (in its log) would stop a restart at the same place: fix it, "
                "then resume with checkpoint.resume=auto."
                if errored
                else " Under torchrun --max-restarts=N with checkpoint.resume=auto the job "
                "restarts from the last complete checkpoint."
            )
            raise RankLostError(
                f"{verdict}. Rank {live.rank} stops too.{hint}" + _waiting_in(exc)
            ) from exc

    return wrapper
