"""Preemption signals: each sets the flag; the launcher's own handler (submitit's SIGUSR2
requeue) is put back when training ends and then called once with the signal, after the
checkpoint; a default handler is not."""

from __future__ import annotations

import os
import signal

import pytest

from mm_moe.trainer import preemption


@pytest.fixture
def launcher_handler():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)
    preemption._pending.clear()


def test_a_launchers_handler_gets_the_signal_after_training_ends(launcher_handler):
    launcher = signal.getsignal(signal.SIGUSR2)
    flag = preemption.PreemptionFlag()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert flag.signal_name == "SIGUSR2" and launcher_handler == []  # training saves first
    flag.restore()
    assert signal.getsignal(signal.SIGUSR2) is launcher
    assert launcher_handler == []
    preemption.pass_on()
    preemption.pass_on()  # once
    assert launcher_handler == [signal.SIGUSR2]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signals_without_a_launchers_handler_are_not_passed_on(sig, launcher_handler):
    before = signal.signal(sig, signal.SIG_DFL)  # as in a plain process (pytest's may differ)
    try:
        flag = preemption.PreemptionFlag()
        os.kill(os.getpid(), sig)
        assert flag.signal_name == signal.Signals(sig).name
        flag.restore()
        assert signal.getsignal(sig) == signal.SIG_DFL
        preemption.pass_on()
        assert launcher_handler == [] and not preemption._pending
    finally:
        signal.signal(sig, before)
