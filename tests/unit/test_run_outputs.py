"""Where a run's outputs go: every held-out evaluation reaches the metrics, whatever
trainer.log_interval is (an evaluation between logged steps was computed and lost); samples
go where the checkpoint is now."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mm_moe.trainer.hooks import EvalHook, MetricsHook


def test_every_evaluation_is_logged_between_log_intervals():
    logged = []
    cfg = SimpleNamespace(trainer=SimpleNamespace(log_interval=5, max_steps=12))
    metrics = SimpleNamespace(log=lambda record: logged.append(dict(record)))
    trainer = SimpleNamespace(
        training=SimpleNamespace(cfg=cfg, metrics=metrics, engine=SimpleNamespace(module=None))
    )
    calls = []
    evaluator = lambda module: calls.append(1) or {"eval/loss": float(len(calls))}  # noqa: E731
    hooks = [EvalHook(evaluator, interval=4), MetricsHook()]
    for step in range(1, 13):
        record = {"step": step, "loss": 1.0, "tokens_loss": 10}
        for hook in hooks:
            hook.after_step(trainer, step, record)
    evals = {r["step"]: r["eval/loss"] for r in logged if "eval/loss" in r}
    assert evals == {4: 1.0, 8: 2.0, 12: 3.0}
    assert sorted(r["step"] for r in logged) == [4, 5, 8, 10, 12]
    assert all("evaluated" not in r for r in logged)


def test_held_out_batches_without_a_modality_are_said_once(caplog):
    """Held-out batches that hold no image tokens (long text documents fill the micro-batches)
    score text only: said once, not left to be found as a missing eval/loss_image."""
    for formats, why in ((["pairs"], "raise eval.num_batches"), (["text"], "text only")):
        sources = [SimpleNamespace(format=f) for f in formats]
        cfg = SimpleNamespace(
            trainer=SimpleNamespace(log_interval=1, max_steps=4),
            eval=SimpleNamespace(sources=sources),
        )
        trainer = SimpleNamespace(
            training=SimpleNamespace(
                cfg=cfg, engine=SimpleNamespace(module=None), dist=SimpleNamespace(is_main=True)
            )
        )
        scores = {"eval/loss_text": 2.0, "eval/tokens_text": 40, "eval/tokens_image": 0}
        hook = EvalHook(lambda module, scores=scores: dict(scores), interval=1)
        caplog.clear()
        with caplog.at_level("WARNING", logger="mm_moe"):
            for step in range(1, 5):
                hook.after_step(trainer, step, {"step": step})
        assert len(caplog.records) == 1
        assert "hold no image tokens: eval/loss_image is not computed" in caplog.text
        assert why in caplog.text  # advice that fits: more batches cannot add images to text


def test_generated_samples_go_where_the_checkpoint_is_now(tmp_path):
    """mm_moe.generate's default out: the run folder the checkpoint sits in now (a moved run,
    its `latest` pointer), beside a step folder copied elsewhere; never the run folder the
    checkpoint's config recorded."""
    from mm_moe.checkpoint import layout
    from mm_moe.generate import default_out

    step = tmp_path / "moved_run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / layout.META).write_text("{}")
    (step.parent / layout.LATEST).write_text(step.name)
    recorded = SimpleNamespace(train_config=SimpleNamespace(trainer=SimpleNamespace(run_dir="/r")))
    for given in (step, step.parent, step.parent / layout.LATEST, tmp_path / "moved_run"):
        assert default_out(str(given), recorded) == (tmp_path / "moved_run" / "samples").resolve()
    lone = tmp_path / "copies" / "step_00000009"
    lone.mkdir(parents=True)
    (lone / layout.META).write_text("{}")
    assert default_out(str(lone), recorded) == (tmp_path / "copies" / "samples").resolve()
    # a folder a user named (an upcycled model): inside it, not shared with its neighbours
    named = tmp_path / "models" / "llama_ec"
    named.mkdir(parents=True)
    (named / layout.META).write_text("{}")
    assert default_out(str(named), recorded) == (named / "samples").resolve()
    assert str(default_out("", recorded)) == "/r/samples"  # a model given without a path


def _written(step_dir):
    """A step's config.yaml as the resume reads it once for its notices."""
    from mm_moe.checkpoint import layout

    return layout.read_config(step_dir, required=False) or {}


def test_a_resume_says_when_the_learning_rate_schedule_moves(tmp_path, caplog):
    """A resume rebuilds the LR schedule from this run's keys: a trainer.max_steps that moves
    the next step's LR is named with both rates; one that does not (optim.decay_steps fixes
    the decay) says nothing; max_steps at the checkpoint's step says nothing is left."""
    import yaml

    from mm_moe.cli import compose
    from mm_moe.config.validate import to_dict
    from mm_moe.trainer.build import _warn_schedule_changes

    def config(*overrides):
        return compose(["experiment=tiny_dense", "optim.warmup_steps=2", *overrides])

    step = tmp_path / "step_00000010"
    step.mkdir()
    (step / "config.yaml").write_text(yaml.safe_dump(to_dict(config("trainer.max_steps=20"))))
    with caplog.at_level("WARNING", logger="mm_moe"):
        _warn_schedule_changes(_written(step), config("trainer.max_steps=40"), 10)
    assert "the learning rate at step 11 is" in caplog.text
    caplog.clear()
    (step / "config.yaml").write_text(
        yaml.safe_dump(to_dict(config("trainer.max_steps=20", "optim.decay_steps=30")))
    )
    with caplog.at_level("WARNING", logger="mm_moe"):
        _warn_schedule_changes(
            _written(step), config("trainer.max_steps=40", "optim.decay_steps=30"), 10
        )
        assert not caplog.text
        _warn_schedule_changes(
            _written(step), config("trainer.max_steps=10", "optim.decay_steps=30"), 10
        )
    assert "nothing to train" in caplog.text


def test_a_resume_at_another_micro_batch_size_says_when_routing_follows_it(tmp_path, caplog):
    """Expert choice (and token choice's balance loss) compute over each micro-batch: a resume
    at another size (micro_batch_size=0 at another world size) names the size that continues
    the run as it was; dense models and the same size say nothing."""
    import yaml

    from mm_moe.cli import compose
    from mm_moe.config.validate import to_dict
    from mm_moe.trainer.build import _warn_micro_batch_change

    def config(moe, micro, world):
        cfg = compose(
            [f"moe={moe}", "trainer.global_batch_size=16", f"trainer.micro_batch_size={micro}"]
        )
        return cfg.for_world(world)

    step = tmp_path / "step_00000004"
    step.mkdir()
    for moe, said in (
        ("moma_4t4i_ec", "expert choice selects"),
        ("moma_4t4i_tc", "balance losses"),
    ):
        (step / "config.yaml").write_text(yaml.safe_dump(to_dict(config(moe, 0, 2))))
        caplog.clear()
        with caplog.at_level("WARNING", logger="mm_moe"):
            _warn_micro_batch_change(_written(step), config(moe, 0, 2))
            _warn_micro_batch_change(_written(step), config(moe, 8, 1))
            assert not caplog.text
            _warn_micro_batch_change(_written(step), config(moe, 0, 1))
        assert "micro-batches of 8 sequences per rank, this run takes 16" in caplog.text
        assert said in caplog.text and "trainer.micro_batch_size=8 continues it" in caplog.text
    (step / "config.yaml").write_text(yaml.safe_dump(to_dict(config("none", 0, 2))))
    caplog.clear()
    with caplog.at_level("WARNING", logger="mm_moe"):
        _warn_micro_batch_change(_written(step), config("none", 0, 1))
    assert not caplog.text


def test_a_warmup_beyond_the_run_is_said(caplog):
    from mm_moe.cli import compose
    from mm_moe.trainer.build import _warn_short_warmup

    with caplog.at_level("WARNING", logger="mm_moe"):
        _warn_short_warmup(compose(["optim.warmup_steps=10", "trainer.max_steps=10"]))
        assert not caplog.text
        _warn_short_warmup(compose(["optim.warmup_steps=10", "trainer.max_steps=4"]))
    assert "optim.warmup_steps=10 is beyond trainer.max_steps=4" in caplog.text
    assert "to 0.4 of optim.lr" in caplog.text
    from mm_moe.trainer.build import _warn_rollback_without_checkpoints

    caplog.clear()
    with caplog.at_level("WARNING", logger="mm_moe"):
        _warn_rollback_without_checkpoints(
            compose(["trainer.spike.action=rollback", "checkpoint.interval=5"])
        )
        assert not caplog.text
        rollback = ["trainer.spike.action=rollback", "checkpoint.interval=0"]
        _warn_rollback_without_checkpoints(compose(rollback))
    assert "no checkpoint is written to roll back to" in caplog.text


def test_hydra_flags_may_follow_the_overrides():
    """`experiment=x --config-dir DIR` (flags after overrides, as wrapper scripts append them)
    reaches Hydra as `--config-dir DIR experiment=x`: argparse refused it before."""
    from mm_moe.config.overrides import command_line, options_first

    argv = ["trainer.max_steps=2", "--config-dir", "/cfg", "moe=my", "-m", "--info", "x=1"]
    ordered = options_first(argv)
    assert ordered == [
        "--config-dir",
        "/cfg",
        "-m",
        "trainer.max_steps=2",
        "moe=my",
        "x=1",
        "--info",
    ]
    args = command_line(ordered)
    assert args.config_dir == "/cfg" and args.overrides == ["trainer.max_steps=2", "moe=my", "x=1"]
    assert options_first(["--info", "config", "a=1"]) == ["--info", "config", "a=1"]


def test_a_file_where_a_run_folder_goes_is_named(tmp_path):
    import pytest

    from mm_moe.cli import compose
    from mm_moe.errors import UserError
    from mm_moe.trainer.build import check_folders
    from mm_moe.trainer.config import TrainerConfig

    taken = tmp_path / "a_file"
    taken.write_text("x")
    cfg = compose(["experiment=tiny_dense", f"trainer.run_dir={taken}"])
    with pytest.raises(UserError, match=r"trainer.run_dir=.*a_file is a file; it must be a folder"):
        check_folders(cfg)
    # under a file: said at the start, not at the first save after the steps are spent
    run = tmp_path / "run"
    cfg = compose(
        ["experiment=tiny_dense", f"trainer.run_dir={run}", f"checkpoint.dir={taken}/sub"]
    )
    with pytest.raises(UserError, match=rf"checkpoint.dir=.*sub cannot be made: {taken} is a file"):
        check_folders(cfg)
    with pytest.raises(UserError, match=r"trainer.cpu_threads=-1 must be >= 0"):
        TrainerConfig(cpu_threads=-1)


def test_a_second_run_into_a_busy_run_folder_is_refused(tmp_path):
    """The lock on <run_dir>/.run.lock: another process is refused with the holder named (and
    this one, while another holds it); the same process may build again (benchmarks,
    notebooks); once released, or once the holder dies, the folder is free."""
    import subprocess
    import sys

    import pytest

    from mm_moe.errors import UserError
    from mm_moe.trainer import run_lock

    folder = str(tmp_path / "run")
    take = f"from mm_moe.trainer import run_lock; run_lock.acquire({folder!r})"
    other = lambda: subprocess.run([sys.executable, "-c", take], capture_output=True, text=True)  # noqa: E731
    key = run_lock.acquire(folder)
    assert run_lock.acquire(folder) == key  # the same process: shared
    run_lock.release(key)
    refused = other()
    assert refused.returncode != 0 and "is in use by another run (pid" in refused.stderr
    run_lock.release(key)
    assert other().returncode == 0  # free again (and that holder's exit released it)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"{take}; print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"is in use by another run \(pid"):
            run_lock.acquire(folder)
    finally:
        holder.kill()
        holder.wait()
    run_lock.release(run_lock.acquire(folder))  # a killed holder leaves no stale lock


def test_a_checkpoint_dir_outside_the_run_folder_is_locked_too(tmp_path):
    """Two runs with their own run folders but one checkpoint.dir (a sweep given one, or one
    run's checkpoints/ named by another): the second is refused naming checkpoint.dir, and
    releases the run folder it had taken."""
    import subprocess
    import sys
    from types import SimpleNamespace

    import pytest

    from mm_moe.cli import compose
    from mm_moe.errors import UserError
    from mm_moe.trainer import run_lock
    from mm_moe.trainer.build import _lock_run_dir

    shared = tmp_path / "ckpt"
    take = (
        f"from mm_moe.trainer import run_lock; run_lock.acquire({str(shared)!r}, 'checkpoint.dir')"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", f"{take}; print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    main = SimpleNamespace(is_main=True)
    cfg = compose([f"trainer.run_dir={tmp_path / 'b'}", f"checkpoint.dir={shared}"])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"checkpoint.dir=.*ckpt is in use by another run"):
            _lock_run_dir(cfg, main)
        assert (tmp_path / "b").resolve() not in run_lock._HELD  # released by the refusal
    finally:
        holder.kill()
        holder.wait()
    keys = _lock_run_dir(cfg, main)
    assert len(keys) == 2
    run_lock.release(keys)
    # checkpoints inside the run folder are locked too: another run may name them
    inside = compose([f"trainer.run_dir={tmp_path / 'c'}"])
    keys = _lock_run_dir(inside, main)
    assert keys[1] == (tmp_path / "c" / "checkpoints").resolve()
    run_lock.release(keys)


def test_a_run_builds_again_in_the_same_process_after_shutdown(tmp_path):
    """A notebook (or a test) builds a run, shuts its process group down and builds another:
    DeepSpeed's cached groups of the first process group are forgotten with it."""
    from mm_moe.cli import compose
    from mm_moe.parallel.distributed import shutdown
    from mm_moe.trainer.build import build_training

    for i in range(2):
        cfg = compose(
            [
                "experiment=tiny_dense",
                "model.d_model=32",
                "model.n_layers=1",
                f"trainer.run_dir={tmp_path / str(i)}",
                "logging.wandb.mode=disabled",
                "eval=none",
            ]
        )
        training = build_training(cfg)
        training.checkpointer.close()
        training.metrics.close()
        shutdown()


def test_generate_samples_at_most_what_max_seq_len_leaves(caplog):
    """max_new_tokens beyond what model.max_seq_len leaves after the prompt is cut to the room
    with a warning (it failed after sampling, losing every sample); a prompt that fills the
    context is refused before sampling."""
    import pytest

    from mm_moe.errors import UserError
    from mm_moe.generate import GenerateConfig, _room_for

    trained = SimpleNamespace(data=SimpleNamespace(seq_len=60))
    model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=100), train_config=trained)
    tok = SimpleNamespace(image=SimpleNamespace(tokens_per_image=16))
    text = GenerateConfig(checkpoint="x", mode="text", max_new_tokens=3000)
    with caplog.at_level("WARNING", logger="mm_moe"):
        assert _room_for(text, model, tok, list(range(30))) == 70
    assert "max_new_tokens=3000 is more than the 70 tokens" in caplog.text
    # positions the model never trained on (past data.seq_len) are said
    assert "reach position 100; the model trained on rows of data.seq_len=60" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mm_moe"):
        short = GenerateConfig(checkpoint="x", max_new_tokens=8)
        assert _room_for(short, model, tok, [1] * 30) == 8
    assert not caplog.text
    image = GenerateConfig(checkpoint="x", mode="image")
    assert _room_for(image, model, tok, [1] * 30) == 17
    with pytest.raises(UserError, match=r"the prompt \(100 tokens\) fills model.max_seq_len=100"):
        _room_for(text, model, tok, [1] * 100)
    # mode=image cannot sample fewer tokens: no room for an image is refused before sampling
    with pytest.raises(UserError, match=r"the prompt \(90 tokens\) and an image \(16 codes"):
        _room_for(image, model, tok, [1] * 90)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_a_temperature_that_is_not_a_number_at_least_0(value):
    from mm_moe.errors import UserError
    from mm_moe.generate import GenerateConfig

    with pytest.raises(UserError, match=f"temperature={float(value)} must be >= 0, a finite"):
        GenerateConfig(checkpoint="x", temperature=float(value))
    with pytest.raises(UserError, match="guidance=.* must be >= 1, a finite number"):
        GenerateConfig(checkpoint="x", guidance=float(value))


def test_guided_images_at_temperature_0_are_greedy():
    """temperature=0 with guidance divided the logits by 0 (nan probabilities): now the
    guided sampler is greedy, the same codes for every seed."""
    import torch

    from mm_moe.eval.text_to_image import sample_image_codes
    from mm_moe.model.config import ModelConfig
    from mm_moe.tokenization.vocab import Vocab

    vocab = Vocab.from_sizes(40, 16)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32)
    torch.manual_seed(0)
    model = cfg.with_vocab(vocab.size).build().eval()
    tok = SimpleNamespace(vocab=vocab, image=SimpleNamespace(tokens_per_image=4))
    prompt = [[vocab.bos, 5, 6, vocab.boi]]
    runs = [sample_image_codes(model, tok, prompt, 0.0, 0, seed, guidance=3.0) for seed in (0, 1)]
    assert runs[0] == runs[1] and len(runs[0][0]) == 4


def test_generate_takes_the_prompt_as_the_text_typed():
    """prompt= is free text: what YAML reads as a mapping (`Q: hi`), a bool or a number is the
    text as typed; a quoted value is its content; null is no prompt, as an empty one."""
    from mm_moe.generate import GenerateConfig, _parse

    typed = {
        "prompt=Q: hi": "Q: hi",
        "prompt=true": "true",
        "prompt=100": "100",
        "prompt=007": "007",
        "prompt=[a, b]": "[a, b]",
        'prompt="a: b"': "a: b",
        "prompt=a handwritten digit 7": "a handwritten digit 7",
        "prompt=null": "",
        "prompt=": "",
    }
    for arg, text in typed.items():
        assert _parse(["checkpoint=x", arg]).prompt == text, arg
    assert _parse(["checkpoint=x"]).prompt == ""
    assert GenerateConfig(checkpoint="x", prompt=None).prompt == ""


def test_generate_refuses_max_new_tokens_with_mode_image(capsys):
    """An image is a fixed number of tokens: max_new_tokens would be ignored."""
    import pytest

    from mm_moe.generate import _parse

    with pytest.raises(SystemExit) as exit_:
        _parse(["checkpoint=x", "mode=image", "max_new_tokens=5"])
    assert exit_.value.code == 2
    assert "max_new_tokens=5 has no effect with mode=image" in capsys.readouterr().err
    assert _parse(["checkpoint=x", "mode=text", "max_new_tokens=5"]).max_new_tokens == 5
    assert _parse(["checkpoint=x", "mode=image"]).mode == "image"


def test_sampling_from_a_model_wider_than_its_vocabulary():
    """model.vocab_size may exceed the vocabulary (padded to a multiple, or set larger): text
    and image sampling mask the model's whole logits width and never sample an id beyond the
    vocabulary (the masks were the vocabulary's width, a shape error)."""
    import torch

    from mm_moe.model.config import ModelConfig
    from mm_moe.sampling import SampleConfig, generate
    from mm_moe.tokenization.vocab import Vocab

    vocab = Vocab.from_sizes(40, 16)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32)
    torch.manual_seed(0)
    model = cfg.with_vocab(vocab.size + 7).build().eval()
    model.set_vocab(vocab)
    sample = SampleConfig(max_new_tokens=24, temperature=1.0, seed=1)
    text = generate(model, vocab, [vocab.bos, 5, 6], 4, sample)
    image = generate(model, vocab, [vocab.bos, 5, vocab.boi], 4, sample)
    assert text and all(t < vocab.size for t in text + image)
    codes = image[:4]
    assert all(vocab.image_offset <= c < vocab.image_offset + vocab.image_size for c in codes)


def test_a_tokenizer_with_another_vocabulary_is_refused_for_a_checkpoint(tmp_path):
    """load_pretrained (generate, eval) with tokenizer.path (and allow_changed) pointing at a
    tokenizer of another vocabulary size: refused naming both sizes, instead of a shape error
    deep in sampling; the same size passes."""
    import pytest

    from mm_moe.errors import UserError
    from mm_moe.eval.pretrained import _check_same_vocabulary
    from mm_moe.tokenization.vocab import Vocab

    recorded = Vocab.from_sizes(800, 9)
    cfg = lambda size: SimpleNamespace(
        data=SimpleNamespace(vocab=lambda tok: Vocab.from_sizes(size, 9)),
        tokenizer=SimpleNamespace(path="tok/b"),
    )
    _check_same_vocabulary(tmp_path, cfg(800), recorded)
    with pytest.raises(UserError, match=r"tok/b: its vocabulary has 545 ids, the checkpoint's 814"):
        _check_same_vocabulary(tmp_path, cfg(531), recorded)


def test_generate_refuses_a_tokenizer_that_did_not_make_the_training_ids():
    """A run on the synthetic data records its tokenizer config (tokenizer=demo) but trains on
    the stand-in ids: generate then stopped on an AssertionError (325, 2304) in sampling; now
    one line says why."""
    import pytest

    from mm_moe.errors import UserError
    from mm_moe.generate import _check_tokenizer_made_the_ids
    from mm_moe.tokenization.vocab import Vocab

    model = lambda source: SimpleNamespace(
        vocab=Vocab.from_sizes(256, 64),
        train_config=SimpleNamespace(data=SimpleNamespace(source=source)),
    )
    tok = lambda text: SimpleNamespace(vocab=Vocab.from_sizes(text, 64))
    _check_tokenizer_made_the_ids(model("synthetic_patterns"), tok(256), "ck")
    with pytest.raises(UserError, match=r"ck: the model was trained on a vocabulary of 325 ids"):
        _check_tokenizer_made_the_ids(model("synthetic_patterns"), tok(2000), "ck")
    with pytest.raises(UserError, match="its tokenizer has changed since"):
        _check_tokenizer_made_the_ids(model("webdataset"), tok(2000), "ck")


def test_a_checkpoints_relative_tokenizer_path_is_found_from_any_folder(tmp_path, monkeypatch):
    """tokenizer.path=tokenizers/demo is relative to where training started: load_pretrained
    and load_tokenizers find it from another working folder through the checkpoint's place
    under its relative checkpoint.dir; elsewhere the path stays as written."""
    from mm_moe.eval.pretrained import _launch_relative

    launched = tmp_path / "repo"
    step_dir = launched / "runs" / "x" / "checkpoints" / "step_00000004"
    step_dir.mkdir(parents=True)
    (launched / "tokenizers" / "demo").mkdir(parents=True)
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(dir="runs/x/checkpoints"))
    monkeypatch.chdir(tmp_path)
    found = _launch_relative(step_dir, cfg, "tokenizers/demo")
    assert found == str(launched / "tokenizers" / "demo")
    assert _launch_relative(step_dir, cfg, "tokenizers/other") == "tokenizers/other"
    moved = SimpleNamespace(checkpoint=SimpleNamespace(dir="elsewhere/checkpoints"))
    assert _launch_relative(step_dir, moved, "tokenizers/demo") == "tokenizers/demo"


def test_a_sample_replacing_an_earlier_one_of_the_same_seed_is_said(tmp_path, caplog):
    """Samples are named by seed: a second checkpoint's sample into the same samples/ folder
    replaced the first without a word."""
    from mm_moe.generate import _save_image
    from mm_moe.tokenization.config import TokenizerConfig

    image = TokenizerConfig().build().image
    codes = list(range(image.tokens_per_image))
    with caplog.at_level("WARNING"):
        first = _save_image(image, codes, tmp_path, 0, 0)
        assert "replacing" not in caplog.text
        assert _save_image(image, codes, tmp_path, 0, 0) == first
    assert f"replacing {first} (an earlier sample of the same seed)" in caplog.text


def test_metrics_rows_cut_short_are_said_and_a_full_disk_does_not_stop_training(tmp_path, caplog):
    """A resume drops a row cut short (said, with its line); a row that cannot be written (a
    full disk) is said once and the run goes on, and said again when rows are written again."""
    import errno

    from mm_moe.cli import compose
    from mm_moe.trainer.metrics import MetricsLogger

    cfg = compose([f"trainer.run_dir={tmp_path}"])
    rows = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n{"step": 3, "lo'
    (tmp_path / "metrics.jsonl").write_text(rows)
    with caplog.at_level("WARNING", logger="mm_moe"):
        logger = MetricsLogger(tmp_path, True, 10, 3, cfg.logging, None)
    assert "1 line(s) that are not whole JSON rows dropped (line 3)" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    whole, logger.file = logger.file, Full()
    row = {"step": 4, "loss": 2.0, "loss_text": 2.0, "loss_image": 2.0, "lr": 1e-3,
           "grad_norm": 1.0, "tokens_per_s": 10.0}  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING", logger="mm_moe"):
        logger.log(row)
        logger.log({**row, "step": 5})
        logger.file = whole
        logger.log({**row, "step": 6})
    assert caplog.text.count("cannot write the row of step 4 (No space left on device)") == 1
    assert "step 5" not in caplog.text and "rows are written again from step 6" in caplog.text
    logger.close()
    assert [
        json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2, 6]


def test_the_summary_counts_checkpoint_writes_that_failed_after_the_last_row():
    from mm_moe.trainer.hooks import write_errors_line

    assert write_errors_line({"checkpoint/write_errors": 0}, 0) is None
    row = {"checkpoint/write_errors": 1}
    assert (
        write_errors_line(row, 3)
        == "checkpoint writes that failed: 3 (2 after the last metrics row)"
    )
    assert write_errors_line(row, 1) == "checkpoint writes that failed: 1"


def test_top_p_keeps_the_most_likely_tokens_that_reach_it():
    """Nucleus sampling against a naive reference: per row, tokens by probability until
    their sum reaches top_p; the most likely token always stays."""
    import torch

    from mm_moe.sampling import truncated

    gen = torch.Generator().manual_seed(0)
    logits_RV = torch.randn(6, 20, generator=gen) * 3
    for top_p in (0.05, 0.5, 0.9, 0.999):
        kept_RV = truncated(logits_RV, 0, top_p, 20) > float("-inf")
        for logits_V, kept_V in zip(logits_RV, kept_RV):
            probs = logits_V.softmax(-1).tolist()
            order = sorted(range(20), key=lambda i: -probs[i])
            want, total = set(), 0.0
            for i in order:
                want.add(i)
                total += probs[i]
                if total >= top_p:
                    break
            assert set(kept_V.nonzero().flatten().tolist()) == want, top_p
    both = truncated(logits_RV, 2, 0.999, 20) > float("-inf")
    assert (both.sum(-1) == 2).all()  # top_k then top_p


def test_generate_refuses_a_top_p_outside_0_1():
    from mm_moe.errors import UserError
    from mm_moe.generate import GenerateConfig

    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(UserError, match="must be in \\(0, 1\\]"):
            GenerateConfig(checkpoint="x", top_p=bad)


def test_wandb_mode_follows_the_environment(monkeypatch):
    """WANDB_MODE (set by cluster scripts, and named by wandb's own hints) was ignored: the
    configured mode was always passed to wandb.init, which then overrides the environment."""
    from mm_moe.trainer.build import _wandb_mode

    for env, configured, want in [
        (None, "offline", "offline"),
        ("online", "offline", "online"),
        ("offline", "online", "offline"),
        ("disabled", "offline", "disabled"),
        ("online", "disabled", "disabled"),  # disabled by either
        ("dryrun", "online", "offline"),
        ("nonsense", "online", "online"),
    ]:
        if env is None:
            monkeypatch.delenv("WANDB_MODE", raising=False)
        else:
            monkeypatch.setenv("WANDB_MODE", env)
        assert _wandb_mode(configured) == want, (env, configured)


def test_sampling_stops_at_a_published_models_other_end_ids(tmp_path):
    """Llama 3 ends a turn with <|eot_id|>, not eos: the upcycle keeps generation_config.json's
    eos list beside the tokenizer, and mm_moe.generate stops at any of its ids."""
    import json

    import torch

    from mm_moe.generate import stop_ids
    from mm_moe.model.config import ModelConfig
    from mm_moe.sampling import SampleConfig, generate
    from mm_moe.tokenization.vocab import Vocab

    vocab = Vocab.from_sizes(40, 16)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9999]}))
    assert stop_ids(SimpleNamespace(path=str(tmp_path)), vocab) == {2, 7}  # ids it has
    assert stop_ids(SimpleNamespace(path=""), vocab) == frozenset()
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32)
    torch.manual_seed(0)
    model = cfg.with_vocab(vocab.size).build().eval()
    greedy = SampleConfig(max_new_tokens=6, temperature=0.0)
    free = generate(model, vocab, [vocab.bos, 5, 6], 4, greedy)
    assert len(free) > 1 and free[0] != vocab.eos
    stopped = generate(model, vocab, [vocab.bos, 5, 6], 4, greedy, stop_ids=frozenset({free[0]}))
    assert stopped == free[:1]


def test_a_wandb_that_fails_is_dropped_and_training_goes_on(tmp_path, caplog):
    """wandb's service process killed (the OOM killer, a crash of its own) ended training with
    a traceback, losing the steps since the last checkpoint; it is said once and dropped."""
    from mm_moe.cli import compose
    from mm_moe.trainer.metrics import MetricsLogger

    cfg = compose([f"trainer.run_dir={tmp_path}"])
    logger = MetricsLogger(tmp_path, True, 10, 0, cfg.logging, None)
    calls = []

    class Dead:
        def log(self, metrics, step):
            calls.append(step)
            raise ConnectionResetError("Connection lost")

        def finish(self):
            raise ConnectionResetError("Connection lost")

    logger.wandb_run = Dead()
    row = {"step": 1, "loss": 2.0, "loss_text": 2.0, "loss_image": 2.0, "lr": 1e-3,
           "grad_norm": 1.0, "tokens_per_s": 10.0}  # fmt: skip
    with caplog.at_level("WARNING", logger="mm_moe"):
        logger.log(row)
        logger.log({**row, "step": 2})
        logger.close()
    assert calls == [1] and caplog.text.count("wandb stopped at step 1") == 1
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_resume_that_makes_other_rows_says_which_keys(tmp_path, caplog):
    """data.seq_len, trainer.global_batch_size or a decode key changed at a webdataset resume
    were taken without a word (the data position stays valid; the rows are not the same)."""
    import yaml

    from mm_moe.cli import compose
    from mm_moe.config.validate import to_dict
    from mm_moe.trainer.build import _say_rows_change

    step = tmp_path / "step_00000004"
    step.mkdir()
    (step / "config.yaml").write_text(yaml.safe_dump(to_dict(compose(["experiment=tiny_dense"]))))
    with caplog.at_level("INFO", logger="mm_moe"):
        _say_rows_change(_written(step), compose(["experiment=tiny_dense"]))
        assert "make other rows" not in caplog.text
        changed = ["experiment=tiny_dense", "data.seq_len=64", "data.pair_order=image_first"]
        _say_rows_change(_written(step), compose(changed))
    assert "data.seq_len: checkpoint 128, this run 64" in caplog.text
    assert "data.pair_order: checkpoint 'random', this run 'image_first'" in caplog.text


def test_a_start_that_fails_while_building_leaves_no_empty_run_folder(tmp_path):
    """The lock makes the run folder (and checkpoints/) before the build reads data and
    tokenizers: a start refused there removes what it made, and only that."""
    import pytest

    from mm_moe.cli import compose
    from mm_moe.errors import UserError
    from mm_moe.trainer.build import build_training

    missing = tmp_path / "shards" / "missing-000000.tar"
    bad_data = ["data=webdataset", f"data.sources=[{{urls: '{missing}', format: tokens}}]"]
    new, kept = tmp_path / "runs" / "new", tmp_path / "kept"
    (kept / "notes").mkdir(parents=True)
    for run_dir in (new, kept):
        cfg = compose(["experiment=tiny_dense", f"trainer.run_dir={run_dir}", *bad_data])
        with pytest.raises(UserError, match="missing-000000.tar"):
            build_training(cfg)
    assert not new.exists() and (tmp_path / "runs").is_dir()
    assert sorted(p.name for p in kept.iterdir()) == ["notes"]  # its checkpoints/ went


def test_generate_says_when_training_would_have_skipped_the_prompt_image(caplog):
    """A 1x1 or strip-shaped prompt image is tokenized (resized) all the same, while training
    skipped its like under data.min_image_side / data.max_aspect_ratio: said, not silent."""
    from PIL import Image

    from mm_moe.data.config import DataConfig
    from mm_moe.generate import _say_if_training_skips

    data = SimpleNamespace(**{**vars(DataConfig()), "source": "webdataset"})
    for size, said in (((1, 1), "min_image_side"), ((200, 20), "max_aspect_ratio"), ((32, 24), "")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="mm_moe"):
            _say_if_training_skips(Image.new("RGB", size), "p.png", data)
        assert (said in caplog.text and "p.png" in caplog.text) if said else not caplog.text
    caplog.clear()  # synthetic data make their own images: nothing was skipped to say
    _say_if_training_skips(Image.new("RGB", (1, 1)), "p.png", DataConfig())
    assert not caplog.text


def test_throughput_is_tokens_over_time_in_the_rows_and_the_summary(tmp_path, caplog):
    """A mean of the steps' rates over-weights fast steps (a contended run: 2.75x too high);
    the logged row carries its interval's tokens over time, and the summary the run's, with
    the last held-out loss."""
    from mm_moe.trainer.hooks import MetricsHook, summary

    logged = []
    cfg = SimpleNamespace(
        trainer=SimpleNamespace(log_interval=2, max_steps=4, run_dir=str(tmp_path)),
        checkpoint=SimpleNamespace(interval=0),
        logging=SimpleNamespace(wandb=SimpleNamespace(mode="disabled")),
    )
    training = SimpleNamespace(
        cfg=cfg,
        metrics=SimpleNamespace(log=lambda r: logged.append(dict(r)), path="m.jsonl"),
        checkpointer=SimpleNamespace(root=tmp_path / "none", write_errors=0),
    )
    trainer = SimpleNamespace(training=training)
    hook, history = MetricsHook(), []
    for step, seconds in zip(range(1, 5), (0.1, 1.9, 1.0, 1.0)):
        record = {"step": step, "loss": 1.0, "tokens_per_s": 1000 / seconds}
        record.update(step_time_s=seconds, loss_text=1.0, loss_image=float("nan"))
        if step == 4:
            record["eval/loss"] = 2.5
        history.append(record)
        hook.after_step(trainer, step, record)
    assert [r["tokens_per_s_interval"] for r in logged] == [1000.0, 1000.0]  # not 5263, 1000
    with caplog.at_level("INFO", logger="mm_moe"):
        summary(history, training)
    said = "held-out loss 2.500 at step 4; 4,000 tokens in 4.0 s of steps (evaluations and "
    assert said in caplog.text and "apart), 1000 tokens/s" in caplog.text


def test_the_progress_bar_needs_a_terminal_with_a_width(monkeypatch):
    """A pseudo-terminal that reports 0 columns drew the bar 0 wide, and the bar replaces the
    step lines: the run showed nothing between its start and `done`. Lines there."""
    import fcntl
    import os
    import pty
    import struct
    import sys
    import termios

    from mm_moe.trainer.metrics import _bar_fits

    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        assert not _bar_fits()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        assert _bar_fits()
    os.close(leader)


def test_a_busy_cpu_is_said_when_the_run_would_spin_its_threads(monkeypatch, caplog):
    """Two threads a process on cores other jobs fill: steps 40-60x slower (a trial)."""
    import os

    from mm_moe.trainer.host_memory import warn_if_cpu_busy

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for load, threads, said in ((6.0, 2, True), (6.0, 1, False), (0.3, 2, False)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        caplog.clear()
        with caplog.at_level("WARNING", logger="mm_moe"):
            warn_if_cpu_busy(threads, processes=1)
        assert ("trainer.cpu_threads=1" in caplog.text) is said
