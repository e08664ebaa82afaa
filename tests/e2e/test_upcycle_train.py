"""An upcycled Hugging Face Llama trains under torchrun with expert parallelism 2 and loads at
expert-parallel size 1."""

from __future__ import annotations

import subprocess

import torch

from mm_moe import load_pretrained
from tests.helpers import PYTHON, REPO, _env, metrics, train
from tests.unit.test_upcycle import DATA_VOCAB, HF_VOCAB, TC_TOP2, make_hf_llama


def test_upcycled_checkpoint_trains_at_ep2_and_loads_at_ep1(tmp_path):
    make_hf_llama(tmp_path / "hf")
    up = tmp_path / "upcycled"
    cmd = [PYTHON, "-m", "mm_moe.upcycle", f"source={tmp_path / 'hf'}", "source_format=hf"]
    cmd += [f"out={up}", "verify=true", "untie=[attention,norms]", *TC_TOP2, *DATA_VOCAB]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verify: function preserved" in proc.stdout

    # The checkpoint's own model and tokenizers come from the overlay it carries, the data on
    # the command line (an overlay sets nothing else); the flag goes after the overrides (Hydra
    # reads the overrides as one run of positional arguments).
    from_upcycled = ["experiment=upcycled", f"checkpoint.resume={up}", *DATA_VOCAB]
    config_dir = ["--config-dir", str(up)]
    ep2 = tmp_path / "ep2"
    proc = train(
        ep2,
        *from_upcycled,
        "parallel.expert_parallel_size=2",
        "trainer.max_steps=3",
        "checkpoint.interval=3",
        *config_dir,
        nproc=2,
    )
    assert "loaded the weights-only checkpoint" in proc.stdout + proc.stderr
    ep2_losses = {m["step"]: m["loss"] for m in metrics(ep2)}
    assert sorted(ep2_losses) == [1, 2, 3]  # fresh schedule and data position: from step 1

    # The same first step on one process (gradient accumulation over the same global batch).
    ep1 = tmp_path / "ep1"
    train(ep1, *from_upcycled, "trainer.max_steps=1", *config_dir)
    ep1_loss = metrics(ep1)[0]["loss"]
    assert abs(ep1_loss - ep2_losses[1]) <= 1e-5 * abs(ep1_loss)

    # The EP=2 result loads whole on one device.
    model = load_pretrained(ep2)
    upcycled = load_pretrained(up)
    assert model.moe_cfg.experts_per_modality == {"text": 4, "image": 4}
    assert model.layers[0].ffn.experts.w_gate_up.shape[0] == 8
    ids = torch.randint(0, HF_VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained, before = model(ids).logits, upcycled(ids).logits
    assert torch.isfinite(trained).all()
    assert not torch.allclose(trained, before)  # three optimizer steps moved the weights
