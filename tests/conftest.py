import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests run offline and quietly; wandb is switched on explicitly where a test checks it.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """(tokenizer dir, held-out shards with labels): the repository's demo build when
    `make train` has made it, else a small one built here from the same packaged data (the
    test machine's case), so the evaluations that need real digits always run.
    MM_MOE_TEST_BUILD_DEMO=1 forces the small build."""
    tok, heldout = REPO / "tokenizers" / "demo", REPO / "data" / "demo" / "heldout"
    if (
        (tok / "vq.pt").exists()
        and heldout.exists()
        and not os.environ.get("MM_MOE_TEST_BUILD_DEMO")
    ):
        return tok, heldout
    from filelock import FileLock

    # Built once per test session, also when pytest-xdist runs several workers (they share
    # the parent of their base temporary directories).
    root = tmp_path_factory.getbasetemp().parent / "demo_assets"
    with FileLock(str(root) + ".lock"):
        if not (root / "done").exists():
            _build_demo_assets(root)
            (root / "done").write_text("ok")
    return root / "tok", root / "demo" / "heldout"


def _build_demo_assets(root: Path) -> None:
    from data_pipelines import build_demo_corpus
    from mm_moe import train_image_tokenizer as train_image
    from mm_moe import train_text_tokenizer as train_text
    from mm_moe.tokenization.config import VQConfig

    corpus, tok = root / "demo", root / "tok"
    build_demo_corpus.build(
        build_demo_corpus.DemoCorpusConfig(
            output=str(corpus), heldout=250, crops_per_photo=1, interleaved_docs=12, overwrite=True
        )
    )
    train_text.train(
        train_text.TrainTextConfig(
            output=str(tok), sources=[str(corpus / "text"), str(corpus / "pairs")], vocab_size=400
        )
    )
    train_image.train(
        train_image.TrainImageConfig(
            output=str(tok),
            sources=[str(corpus / "pairs")],
            vq=VQConfig(codebook_size=64, code_dim=8, channels=16),
            steps=60,
            batch_size=32,
            max_images=1000,
        )
    )


@pytest.fixture(autouse=True)
def _environment_restored():
    """A test that builds a training run in this process (build_training) sets RANK,
    MASTER_PORT, ... for its world of one; later tests' subprocesses must not inherit them (they
    would join that port and fail with EADDRINUSE)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
