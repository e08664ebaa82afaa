"""Exact resume, and a crash in the middle of a checkpoint write."""

from __future__ import annotations

import pytest

from mm_moe.checkpoint import layout
from tests.helpers import PYTHON, REPO, losses, metrics, train

STEPS = 20


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    train(run_dir, f"trainer.max_steps={STEPS}")
    return losses(run_dir)


def test_resume_continues_exactly(tmp_path, straight):
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.max_steps=10", "checkpoint.interval=10")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    train(run_dir, f"trainer.max_steps={STEPS}", "checkpoint.resume=auto")
    resumed = losses(run_dir)
    # The metrics file reads like one uninterrupted run.
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])


def test_a_requeued_job_resumes_its_own_checkpoints(tmp_path):
    """Slurm requeues (and torchrun restarts) rerun the first command: a job that started from
    another run's checkpoint continues from its own latest on a restart, where a plain rerun
    of that command is refused (it would start a second line of checkpoints on the first).
    The job takes the other run's weights alone (checkpoint.weights_only: other data, step 0,
    a fresh schedule); its own checkpoints still resume whole."""
    source, run_dir = tmp_path / "source", tmp_path / "run"
    train(source, "trainer.max_steps=4", "checkpoint.interval=4")
    first = (
        "trainer.max_steps=6",
        "checkpoint.interval=2",
        f"checkpoint.resume={source}/checkpoints",
        "checkpoint.weights_only=true",
        "trainer.seed=7",  # other data (the synthetic source would not refuse it whole)
    )
    train(run_dir, *first[1:], "trainer.max_steps=4")  # "preempted" after its step-4 checkpoint
    before, source_rows = losses(run_dir), metrics(source)
    assert sorted(before) == [1, 2, 3, 4]  # from step 0, on the source's trained weights
    assert before[1] < source_rows[0]["loss"] - 0.05
    assert metrics(run_dir)[0]["lr"] == source_rows[0]["lr"]  # a fresh schedule
    refused = train(run_dir, *first, check=False)
    assert refused.returncode != 0 and "already holds checkpoints" in refused.stderr
    restarted = train(run_dir, *first, env={"SLURM_RESTART_COUNT": "1"})
    printed = restarted.stdout + restarted.stderr
    assert "restart 1 of this job: resuming its own latest checkpoint" in printed
    assert "step_00000004" in printed
    after = losses(run_dir)
    assert max(before) == 4 and sorted(after) == [*sorted(before), 5, 6]
    assert all(after[step] == loss for step, loss in before.items())


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path, straight):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    env_launcher = [
        "env",
        "KILL_AT_STEP=10",
        f"PYTHONPATH={REPO}",
        PYTHON,
        str(REPO / "tests" / "e2e" / "kill_during_save.py"),
    ]
    proc = train(
        run_dir,
        f"trainer.max_steps={STEPS}",
        "checkpoint.interval=5",
        launcher=env_launcher,
        check=False,
    )
    assert proc.returncode == -9 or proc.returncode == 137, proc.stderr[-3000:]
    # The write of step 10 was cut short: its tensors are in a temporary directory, and
    # `latest` still names the previous complete checkpoint.
    assert (root / ".tmp-step_00000010" / "optimizer.pt").exists()
    assert not (root / "step_00000010").exists()
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert layout.latest_step_dir(root) == root / "step_00000005"

    train(run_dir, f"trainer.max_steps={STEPS}", "checkpoint.resume=auto", "checkpoint.interval=5")
    resumed = losses(run_dir)
    for step in range(6, STEPS + 1):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])
    assert not (root / ".tmp-step_00000010").exists()  # cleaned up by the next save
    assert (root / "latest").read_text().strip() == f"step_{STEPS:08d}"


def _signalled_run(run_dir, sig) -> tuple[int, str]:
    """(exit status, output) of a long training run sent `sig` after its third logged step."""
    import subprocess
    import time

    from tests.helpers import TINY, _env

    cmd = [
        PYTHON,
        "-m",
        "mm_moe.train",
        *TINY,
        f"trainer.run_dir={run_dir}",
        "trainer.max_steps=100000",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_ctrl_c_ends_with_one_line_naming_the_resume(tmp_path):
    """Ctrl-C (SIGINT) stops at once, with one line that says how to continue and status 130,
    not a 59-line traceback."""
    import signal

    status, out = _signalled_run(tmp_path / "run", signal.SIGINT)
    assert status == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "mm_moe.train: interrupted (Ctrl-C); checkpoint.resume=auto continues" in out


def test_sigterm_checkpoints_at_step_boundary_and_exits_zero(tmp_path, straight):
    import signal

    run_dir = tmp_path / "run"
    status, out = _signalled_run(run_dir, signal.SIGTERM)
    assert status == 0, out[-3000:]
    saved = layout.latest_step_dir(run_dir / "checkpoints")
    assert saved is not None and "SIGTERM received" in out
    stopped_at = int(saved.name.split("_")[1])
    assert 3 <= stopped_at < STEPS, stopped_at
    train(run_dir, f"trainer.max_steps={STEPS}", "checkpoint.resume=auto")
    resumed = losses(run_dir)
    for step in range(1, STEPS + 1):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])


def test_a_rewound_run_keeps_its_own_checkpoints_under_an_older_line(tmp_path):
    """Resumed at step 4 of a run that had saved 8 and 12: the warning names the older line,
    keep_last never removes the step just written, and resume=auto continues the new line
    (metrics without a hole)."""
    ckpts = tmp_path / "checkpoints"
    train(tmp_path, "trainer.max_steps=12", "checkpoint.interval=4", "checkpoint.keep_last=0")
    rewound = train(
        tmp_path,
        "trainer.max_steps=8",
        "checkpoint.interval=4",
        "checkpoint.keep_last=1",
        f"checkpoint.resume={ckpts}/step_00000004",
    )
    assert "holds steps after the resumed step 4 (step_00000008, step_00000012)" in (
        rewound.stdout + rewound.stderr
    )
    assert (ckpts / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000008", "step_00000012"]
    train(tmp_path, "trainer.max_steps=10", "checkpoint.interval=4", "checkpoint.resume=auto")
    assert sorted(losses(tmp_path)) == list(range(1, 11))


def test_a_resume_whose_data_move_the_ids_is_refused(tmp_path):
    """Other synthetic vocabulary keys of the same total size (6 text ids fewer, 6 image codes
    more) move every image id: the weights would go on training on ids that mean other tokens
    while the model's size check sees nothing. Refused, weights-only too, naming both."""
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.max_steps=1", "checkpoint.interval=1")
    step = run_dir / "checkpoints" / "step_00000001"
    moved = ["data.synthetic.text_vocab_size=250", "data.synthetic.image_codebook_size=70"]
    for weights_only in ("true", "false"):
        how = f"checkpoint.weights_only={weights_only}"
        proc = train(tmp_path / weights_only, f"checkpoint.resume={step}", how, *moved, check=False)
        said = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "image codes 261..324, 325 ids" in said, said[-2000:]
        assert "this run's data make text 0..249" in said and "data.synthetic" in said
