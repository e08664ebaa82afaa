"""Atomic step directories and the latest pointer."""

from __future__ import annotations

import pytest

from mm_moe.checkpoint import layout


def _save(root, step):
    tmp = layout.new_tmp_dir(root, step)
    (tmp / "model.pt").write_bytes(b"x")
    (tmp / layout.META).write_text("{}")
    return layout.publish(root, tmp, step)


def test_publish_moves_latest_and_prune_keeps_last(tmp_path):
    for step in (5, 10, 15):
        _save(tmp_path, step)
    assert (tmp_path / "latest").read_text().strip() == "step_00000015"
    layout.prune(tmp_path, keep_last=2)
    assert layout.complete_steps(tmp_path) == [10, 15]


def test_unfinished_tmp_dir_is_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 5)
    tmp = layout.new_tmp_dir(tmp_path, 10)
    (tmp / "model.pt").write_bytes(b"partial")
    assert layout.latest_step_dir(tmp_path) == tmp_path / "step_00000005"
    assert layout.resolve_resume("auto", tmp_path) == tmp_path / "step_00000005"
    _save(tmp_path, 10)
    layout.prune(tmp_path, keep_last=0)
    assert not list(tmp_path.glob(".tmp-*"))


def test_dangling_pointer_falls_back_to_newest_complete(tmp_path):
    _save(tmp_path, 5)
    _save(tmp_path, 10)
    (tmp_path / "latest").write_text("step_00000099\n")
    assert layout.latest_step_dir(tmp_path) == tmp_path / "step_00000010"


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 5)
    final = _save(tmp_path, 5)
    assert final.is_dir() and not list(tmp_path.glob(".old-*"))


def test_resume_values(tmp_path):
    assert layout.resolve_resume("none", tmp_path) is None
    assert layout.resolve_resume("auto", tmp_path) is None  # nothing yet: fresh start
    step_dir = _save(tmp_path, 5)
    assert layout.resolve_resume(str(step_dir), tmp_path / "elsewhere") == step_dir
    assert layout.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == step_dir
    with pytest.raises(ValueError, match="checkpoint.resume"):
        layout.resolve_resume(str(tmp_path / "missing"), tmp_path)
    # a run folder (its checkpoints/), and the latest pointer file itself
    run = tmp_path / "run"
    in_run = _save(run / "checkpoints", 7)
    assert layout.resolve_resume(str(run), tmp_path / "elsewhere") == in_run
    assert layout.resolve_resume(str(run / "checkpoints" / "latest"), tmp_path) == in_run


def test_a_latest_step_without_its_meta_is_said_before_the_one_before_is_taken(tmp_path, caplog):
    _save(tmp_path, 10)
    twelve = _save(tmp_path, 12)
    (twelve / layout.META).unlink()
    with caplog.at_level("WARNING"):
        for _ in range(3):  # a resume looks several times: said once
            assert layout.resolve_resume("auto", tmp_path) == tmp_path / "step_00000010"
    assert caplog.text.count(f"skipping {twelve} as incomplete: latest names it") == 1


def test_damaged_meta_is_a_clear_error_and_auto_resume_takes_the_previous_step(tmp_path, caplog):
    from types import SimpleNamespace

    from mm_moe.checkpoint import state
    from mm_moe.errors import UserError

    _save(tmp_path, 5)
    damaged = _save(tmp_path, 10)
    (damaged / layout.META).write_text('{"format_version": 2, "step": 1')  # cut mid-write
    with caplog.at_level("WARNING"):
        assert layout.resolve_resume("auto", tmp_path) == tmp_path / "step_00000005"
        assert layout.resolve_resume("auto", tmp_path) == tmp_path / "step_00000005"
    assert caplog.text.count(f"skipping {damaged}") == 1 and "meta.json" in caplog.text
    assert layout.complete_steps(tmp_path) == [5]
    # named explicitly: a UserError naming the file, not a JSONDecodeError traceback
    engine = SimpleNamespace(lr_scheduler=None)
    with pytest.raises(UserError, match=rf"{damaged / layout.META} is damaged.*resume=auto"):
        state.load(layout.resolve_resume(str(damaged), tmp_path), engine, None, 0, 1)
    (damaged / layout.META).write_text("[1, 2]")  # valid JSON, but not the object saved
    with pytest.raises(UserError, match="must be the JSON object"):
        layout.read_meta(damaged)
    (damaged / layout.META).write_text('{"step": 1}')
    with pytest.raises(UserError, match=r"damaged \(no format_version\)"):
        state.load(damaged, engine, None, 0, 1)
    (damaged / layout.META).write_text('{"format_version": 2, "step": 1, "world_size": 1}')
    with pytest.raises(UserError, match=r"damaged \(no scheduler, data\)"):
        state.load(damaged, engine, None, 0, 1)
    (damaged / layout.META).write_text('{"format_version": 2, "step": "x"}')  # a hand edit
    with pytest.raises(UserError, match=r"damaged \(not a count: step='x'\)"):
        layout.read_meta(damaged)


def _training_save(root, step):
    """A step as a training save writes it: meta with a schedule, three torch.save files."""
    import json

    import torch

    tmp = layout.new_tmp_dir(root, step)
    for name in ("model.pt", "optimizer.pt", "rng.pt"):
        torch.save({"w": torch.full((64, 64), float(step))}, tmp / name)
    (tmp / layout.CONFIG).write_text("model:\n  d_model: 64\n  document_masking: true\n")
    (tmp / layout.META).write_text(json.dumps({"format_version": 2, "step": step, "scheduler": {}}))
    return layout.publish(root, tmp, step)


def test_auto_resume_skips_a_step_with_a_truncated_or_missing_file_and_says_why(tmp_path, caplog):
    """A latest step whose model.pt was cut short (or whose rng.pt is gone) is skipped by
    checkpoint.resume=auto with the reason; named explicitly, the load error names the complete
    steps beside it."""
    from mm_moe.errors import UserError

    for step in (4, 8):
        _training_save(tmp_path, step)
    twelve = _training_save(tmp_path, 12)
    whole = (twelve / "model.pt").read_bytes()
    (twelve / "model.pt").write_bytes(whole[:1000])
    with caplog.at_level("WARNING"):
        assert layout.resolve_resume("auto", tmp_path) == tmp_path / "step_00000008"
    assert f"skipping {twelve} as incomplete: its model.pt is damaged or truncated" in caplog.text
    with pytest.raises(UserError, match=r"resume from a complete step beside it \(step_00000004, "):
        layout.read_tensors(twelve / "model.pt")
    (twelve / "model.pt").write_bytes(whole)
    (twelve / "rng.pt").unlink()
    layout._warned_incomplete.clear()
    with caplog.at_level("WARNING"):
        assert layout.resolve_resume("auto", tmp_path) == tmp_path / "step_00000008"
    assert "its rng.pt is missing" in caplog.text
    # config.yaml (resume compares the model with it): missing, or cut into values nobody
    # saved, the step resumed without the check, or stopped on a key the user never set
    torch_rng = twelve / "rng.pt"
    torch_rng.write_bytes((tmp_path / "step_00000008" / "rng.pt").read_bytes())
    config = (twelve / layout.CONFIG).read_text()
    for broken, said in ((None, "missing"), (config[: config.index("true")], "damaged")):
        if broken is None:
            (twelve / layout.CONFIG).unlink()
        else:
            (twelve / layout.CONFIG).write_text(broken)  # ends in `document_masking:` (null)
        layout._warned_incomplete.clear()
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert layout.resolve_resume("auto", tmp_path) == tmp_path / "step_00000008"
        assert "its config.yaml is missing or damaged" in caplog.text, said


def test_pruning_keeps_the_step_just_written_below_an_older_line(tmp_path, caplog):
    """Resumed at step 4 of a run that had saved 8 and 12, the new line's step 8 (replacing
    the old 8) is kept with keep_last=1, where the highest steps used to be kept and the step
    just written was removed; the old line's 12 stays, and a pointer naming no step is said."""
    for step in (4, 8, 12):
        _save(tmp_path, step)
    assert layout.newer_steps(tmp_path, 4) == [8, 12]
    _save(tmp_path, 8)  # the resumed line's first save
    layout.prune(tmp_path, keep_last=1, current=8)
    assert layout.complete_steps(tmp_path) == [8, 12]
    assert (tmp_path / "latest").read_text().strip() == "step_00000008"
    _save(tmp_path, 10)
    (tmp_path / "step_00000010" / layout.META).unlink()  # this line's newest, damaged
    assert layout.latest_step_dir(tmp_path) == tmp_path / "step_00000008"  # not the older 12
    (tmp_path / "latest").write_text("")
    with caplog.at_level("WARNING"):
        assert layout.latest_step_dir(tmp_path) == tmp_path / "step_00000012"
    assert "holds '', not a step folder's name: taking the newest complete step" in caplog.text
    (tmp_path / "latest").unlink()  # gone: taking the newest is said too (it was silent)
    layout._warned_incomplete.clear()
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert layout.latest_step_dir(tmp_path) == tmp_path / "step_00000012"
    assert "has no latest pointer: taking the newest complete step, step_00000012" in caplog.text


def _train_cfg(run_dir, *overrides):
    from hydra import compose, initialize_config_dir

    from mm_moe.train import CONFIG_DIR, build_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        args = ["experiment=tiny_dense", f"trainer.run_dir={run_dir}", *overrides]
        return build_config(compose("train", overrides=args))


def test_fresh_run_refuses_a_run_dir_with_metrics_but_no_checkpoint(tmp_path):
    """A fresh start deletes metrics.jsonl (MetricsLogger): an earlier run's rows are refused
    like its checkpoints, unless checkpoint.overwrite=true."""
    import torch

    from mm_moe.errors import UserError
    from mm_moe.parallel.distributed import DistInfo
    from mm_moe.trainer.build import _resume_dir
    from mm_moe.trainer.metrics import MetricsLogger

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n'
    (run_dir / "metrics.jsonl").write_text(rows)
    main = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    other = tmp_path / "other" / "step_00000002"  # another run's checkpoint: a fresh line here
    _save(other.parent, 2)
    for extra in ([], [f"checkpoint.resume={other}"]):
        with pytest.raises(UserError, match=r"metrics\.jsonl.*checkpoint\.overwrite=true"):
            _resume_dir(_train_cfg(run_dir, *extra), main)
        assert (run_dir / "metrics.jsonl").read_text() == rows
    # resume=auto with nothing to resume restarts this run at step 0 (preempted before its
    # first checkpoint): its rows are cut back like any resume's.
    assert _resume_dir(_train_cfg(run_dir, "checkpoint.resume=auto"), main) is None
    # ... but rows past a step that saved mean its checkpoints are elsewhere: refused
    auto_every_2 = ("checkpoint.resume=auto", "checkpoint.interval=2")
    with pytest.raises(UserError, match=r"rows up to step 2, past checkpoint.interval=2"):
        _resume_dir(_train_cfg(run_dir, *auto_every_2), main)
    assert (run_dir / "metrics.jsonl").read_text() == rows
    cfg = _train_cfg(run_dir, "checkpoint.overwrite=true")
    assert _resume_dir(cfg, main) is None
    MetricsLogger(run_dir, True, 10, 0, cfg.logging, None).close()
    assert (run_dir / "metrics.jsonl").read_text() == ""  # replaced, as asked


def test_resume_auto_over_only_damaged_steps_is_refused_not_started_over(tmp_path, caplog):
    """Every saved step damaged (a storage incident, a bad copy): resume=auto used to start at
    step 0 over them, cutting the metrics and replacing the steps. Refused, naming them;
    checkpoint.overwrite=true starts over and removes them."""
    import torch

    from mm_moe.errors import UserError
    from mm_moe.parallel.distributed import DistInfo
    from mm_moe.trainer.build import _resume_dir

    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    for step in (4, 8):
        cut = _training_save(ckpts, step) / "model.pt"
        cut.write_bytes(cut.read_bytes()[:100])
    main = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    with pytest.raises(UserError, match=r"saved steps \(step_00000004, step_00000008\) but none"):
        _resume_dir(_train_cfg(run_dir, "checkpoint.resume=auto"), main)
    assert layout.step_folders(ckpts) == ["step_00000004", "step_00000008"]
    _resume_dir(_train_cfg(run_dir, "checkpoint.resume=auto", "checkpoint.overwrite=true"), main)
    assert layout.step_folders(ckpts) == []


def moe_engine():
    """A single-process engine as the checkpoint code sees it: an MoE model (experts stacked
    in memory, one entry each on disk), AdamW after one step, its LR schedule."""
    from types import SimpleNamespace

    import torch

    from mm_moe.model.config import ModelConfig
    from mm_moe.model.moe.config import MoEConfig
    from mm_moe.trainer.config import OptimConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1)
    model = cfg.build(MoEConfig(experts_per_modality={"text": 2, "image": 2}))
    optim = OptimConfig(warmup_steps=0)
    optimizer = optim.build(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    schedule = optim.build_schedule(optimizer, max_steps=10)
    return SimpleNamespace(
        module=model, optimizer=optimizer, lr_scheduler=schedule, aux_routers=None
    )


class StubLoader:
    vocab = None

    def state_dict(self) -> dict:
        return {"position": 3}

    def load_state_dict(self, state: dict) -> None:
        assert state == {"position": 3}


def test_engine_state_round_trips_through_the_files_with_experts_one_entry_each(tmp_path):
    """What parallel/ hands over by name is what checkpoint/ reads back, through the files of
    format 2 (every expert one entry, moments beside) and of format 1 (experts stacked)."""
    import torch

    from mm_moe.checkpoint import tensors
    from mm_moe.parallel import full_state

    engine = moe_engine()
    local = full_state.local_state(engine)
    weights, optimizer = tensors.to_files(local, engine.module)
    experts = "layers.0.ffn.experts"
    assert f"{experts}.w_down" not in weights
    assert torch.equal(weights[f"{experts}.image.1.w_down"], local[f"model/{experts}.w_down"][3])
    assert optimizer["step"] == 1 and set(optimizer) == {"step", "moments"}
    moment = optimizer["moments"][f"{experts}.text.0.w_gate_up"]["exp_avg_sq"]
    assert torch.equal(moment, local[f"optimizer/{experts}.w_gate_up/exp_avg_sq"][0])
    torch.save(weights, tmp_path / "model.pt")
    torch.save(optimizer, tmp_path / "optimizer.pt")
    back = tensors.read(tmp_path, engine.module)
    assert back.keys() == local.keys() and all(torch.equal(back[k], local[k]) for k in local)
    # A rank of an expert-parallel run reads its own experts only (not a copy of every one)
    engine.module.layers[0].ffn.experts.global_ids = [1, 3]  # as expert parallelism sets
    mine = tensors.read(tmp_path, engine.module)
    engine.module.layers[0].ffn.experts.global_ids = None
    for key in (f"model/{experts}.w_down", f"optimizer/{experts}.w_gate_up/exp_avg"):
        assert torch.equal(mine[key], local[key][[1, 3]])
    # A rank that writes nothing keeps no host copy of the model (the collectives only)
    assert not any(k.startswith("model/") for k in full_state.local_state(engine, keep=False))
    stacked = {k.removeprefix("model/"): v for k, v in local.items() if k.startswith("model/")}
    torch.save(stacked, tmp_path / "model.pt")  # format 1
    back = tensors.read(tmp_path, engine.module, optimizer=False)
    assert back.keys() == {"model/" + k for k in stacked}
    assert all(torch.equal(back["model/" + k], v) for k, v in stacked.items())


def test_a_save_that_fails_inside_torch_save_says_how_full_the_disk_is(tmp_path):
    """torch.save reports a full disk as 'unexpected pos' (a RuntimeError without errno): the
    error names the file and the free space, and the step folder is not published."""
    from types import SimpleNamespace

    from mm_moe.checkpoint import state

    staged = SimpleNamespace(
        step=3, model={}, optimizer={}, rng=[], config_yaml="a: 1\n", vocab_yaml=None,
        meta_json="{}",
    )  # fmt: skip

    def full(obj, path):
        if path.name == "optimizer.pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2713280")
        path.write_text("x")

    with pytest.raises(OSError, match=r"MiB free on the disk of .*a full disk.*optimizer.pt"):
        state.write(staged, tmp_path, keep_last=3, save=full)
    assert layout.step_folders(tmp_path) == [] and not list(tmp_path.glob(".tmp-*"))


def test_a_file_in_torchs_legacy_format_is_read_unmapped(tmp_path):
    """Checkpoint files are memory-mapped; torch's pre-zip format cannot be, and was then
    called damaged: it is read whole instead."""
    import torch

    path = tmp_path / "model.pt"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(layout.read_tensors(path)["w"], torch.arange(3.0))
