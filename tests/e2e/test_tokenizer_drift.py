"""Tokenizer drift: a checkpoint records a digest of its tokenizer's files; resume, generate and
load_pretrained accept the same files moved elsewhere, refuse changed ones naming both digests,
and go on with tokenizer.allow_changed=true."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

import mm_moe
from mm_moe.errors import UserError
from mm_moe.tokenization.config import TokenizerConfig, unified_vocab
from mm_moe.tokenization.digest import tokenizer_digest
from mm_moe.tokenization.sentencepiece_text import SentencePieceTextTokenizer, train_sentencepiece
from tests.helpers import train


def sentencepiece_tokenizer(folder, first: int) -> None:
    """A small trained tokenizer; another `first` gives other merges at the same size."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)][first : first + 60]
    train_sentencepiece(texts, folder, vocab_size=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, tokenizer overrides): 2 steps on the synthetic source laid out by a
    sentencepiece tokenizer's vocabulary (so generate decodes what the model emits)."""
    root = tmp_path_factory.mktemp("drift")
    sentencepiece_tokenizer(root / "tok", first=0)
    text = SentencePieceTextTokenizer(root / "tok" / "text.model")
    unified_vocab(text, 64).save(root / "vocab.yaml")  # the grid quantizer's 64 codes
    keys = ["tokenizer.text=sentencepiece", f"tokenizer.vocab={root / 'vocab.yaml'}"]
    train(
        root / "run",
        *keys,
        f"tokenizer.path={root / 'tok'}",
        "trainer.max_steps=2",
        "checkpoint.interval=2",
    )
    return root, keys


def _moved(root, to) -> str:
    """The run's tokenizer folder, copied to `to` (same files, another path)."""
    shutil.copytree(root / "tok", to)
    return str(to)


def _digest(meta_dir) -> str:
    return json.loads((meta_dir / "meta.json").read_text())["tokenizer_digest"]


def test_resume_accepts_a_moved_tokenizer_and_refuses_a_changed_one(run, tmp_path):
    root, keys = run
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    step2 = run_dir / "checkpoints" / "step_00000002"
    recorded = _digest(step2)
    assert recorded.startswith("sha256:") and len(recorded) == len("sha256:") + 64
    moved = _moved(root, tmp_path / "moved")
    resume = [*keys, "checkpoint.resume=auto", "checkpoint.interval=1"]
    train(run_dir, *resume, f"tokenizer.path={moved}", "trainer.max_steps=3")
    assert _digest(run_dir / "checkpoints" / "step_00000003") == recorded  # same files
    sentencepiece_tokenizer(tmp_path / "moved", first=60)  # rebuilt in place
    proc = train(run_dir, *resume, f"tokenizer.path={moved}", "trainer.max_steps=4", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    changed = TokenizerConfig(text="sentencepiece", path=moved, vocab=str(root / "vocab.yaml"))
    now = tokenizer_digest(changed)
    assert now != recorded and f"tokenizer {recorded}" in proc.stderr and now in proc.stderr
    assert "tokenizer.allow_changed=true" in proc.stderr and "Traceback" not in proc.stderr
    allowed = [f"tokenizer.path={moved}", "tokenizer.allow_changed=true", "trainer.max_steps=4"]
    proc = train(run_dir, *resume, *allowed)
    assert "tokenizer.allow_changed=true" in proc.stdout + proc.stderr  # the warning
    assert _digest(run_dir / "checkpoints" / "step_00000004") == now  # the new one recorded


def test_load_pretrained_and_generate_compare_the_tokenizer(run, tmp_path, caplog):
    from mm_moe.generate import GenerateConfig, GenerateTokenizer
    from mm_moe.generate import run as generate

    root, _ = run
    step = root / "run" / "checkpoints" / "step_00000002"
    moved = _moved(root, tmp_path / "moved")
    model = mm_moe.load_pretrained(step, tokenizer={"path": moved})
    assert model.train_config.tokenizer.path == moved
    mm_moe.load_tokenizers(step, tokenizer={"path": moved})
    ask = dict(checkpoint=str(step), prompt="def", mode="text", max_new_tokens=3)
    out = tmp_path / "samples"
    assert generate(GenerateConfig(**ask, out=str(out), tokenizer=GenerateTokenizer(path=moved)))

    sentencepiece_tokenizer(tmp_path / "moved", first=60)  # rebuilt in place
    for load in (mm_moe.load_pretrained, mm_moe.load_tokenizers):
        with pytest.raises(UserError, match=rf"made with the tokenizer {_digest(step)}.*sha256:"):
            load(step, tokenizer={"path": moved})
    with pytest.raises(UserError, match="tokenizer.allow_changed=true"):
        generate(GenerateConfig(**ask, out=str(out), tokenizer=GenerateTokenizer(path=moved)))
    overrides = GenerateTokenizer(path=moved, allow_changed=True)
    with caplog.at_level(logging.WARNING):
        assert generate(GenerateConfig(**ask, out=str(out), tokenizer=overrides))
    assert "going on: tokenizer.allow_changed=true" in caplog.text

    # a checkpoint from before digests: loads, and says so
    old = tmp_path / "old_step"
    shutil.copytree(step, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["tokenizer_digest"]
    (old / "meta.json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        mm_moe.load_pretrained(old, tokenizer={"path": moved})
    assert "records no tokenizer digest" in caplog.text
