"""A single-node Slurm cluster on localhost for tests: Debian's slurmctld, slurmd and munge,
started without systemd, state under a temporary directory.

    with LocalSlurm(tmp_dir, cpus=2) as slurm:
        slurm.sbatch(["--wait", "script.sbatch"])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SLURM_CONF = Path("/etc/slurm/slurm.conf")


def install() -> None:
    """Install Slurm from Debian's packages when it is missing (needs root)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
        capture_output=True,
    )


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = Path(root), cpus
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "run"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        conf = f"""
ClusterName=mm_moe_test
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MinJobAge=4
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(conf)

    def _start_munge(self) -> None:
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            shutil.chown(key, "munge", "munge")
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)

    def __enter__(self) -> LocalSlurm:
        install()
        self._write_conf()
        self._start_munge()
        subprocess.run(["slurmctld", "-c", "-i"], check=True)
        subprocess.run(["slurmd"], check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"local Slurm did not come up; see {self.root / 'log'}")

    def sbatch(
        self, args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sbatch", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )

    def __exit__(self, *exc) -> None:
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = self.root / "run" / pid_file
            if path.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(path.read_text().strip()), 15)
        time.sleep(1)
