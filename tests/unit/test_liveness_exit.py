"""A process whose heartbeat thread is still running when it ends (no shutdown(): a script's own
exit, a test harness) stops that thread before the interpreter finalizes: a daemon thread in a
C++ store call at finalization aborts the process ("terminate called without an active
exception") after a successful run."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_heartbeat_thread_is_stopped_before_finalization():
    program = textwrap.dedent(
        """
        import atexit, datetime, os
        import torch.distributed as dist
        from mm_moe.parallel.distributed import Liveness

        server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=5))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(server.port))
        holder = {}

        def after_every_later_handler():  # atexit runs last-registered first
            thread = holder["live"]._thread
            print("heartbeat thread alive at exit:", thread.is_alive(), flush=True)

        atexit.register(after_every_later_handler)
        live = holder["live"] = Liveness(0, 1, timeout_s=20)
        assert live._thread.is_alive()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "heartbeat thread alive at exit: False" in done.stdout, done.stdout + done.stderr


def test_the_restart_hint_is_for_lost_ranks_not_for_a_ranks_own_error(monkeypatch):
    """A peer that stopped on its own error (bad data under data.on_error=raise) would stop a
    torchrun restart at the same place: rank 0 no longer recommends restarts for it."""
    from types import SimpleNamespace

    import pytest

    from mm_moe.parallel import distributed

    @distributed.names_lost_ranks
    def collective():
        raise RuntimeError("Connection closed by peer")

    for verdict, said, not_said in [
        (
            f"rank 1 {distributed.ERRORED}",
            "would stop a restart at the same place",
            "--max-restarts",
        ),
        ("lost rank 1: its process is gone", "--max-restarts=N", "would stop a restart"),
    ]:
        live = SimpleNamespace(rank=0, diagnose=lambda v=verdict: v, mark_exit=lambda ok: None)
        monkeypatch.setattr(distributed, "_LIVENESS", live)
        with pytest.raises(distributed.RankLostError) as err:
            collective()
        assert said in str(err.value) and not_said not in str(err.value), str(err.value)
