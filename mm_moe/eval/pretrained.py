"""Loading a trained model and its tokenizers: the implementation of the public
`mm_moe.load_pretrained` and `mm_moe.load_tokenizers` (mm_moe/api.py), for library packages
(eval, upcycle) that must not import the top-level API."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mm_moe.checkpoint.layout import META, VOCAB
from mm_moe.errors import UserError

log = logging.getLogger("mm_moe")


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", tokenizer: dict | None = None
):
    """A trained model from a checkpoint (step, checkpoint or run directory, or an upcycled
    checkpoint), in eval mode (causal auxiliary routers for expert choice and
    mixture-of-depths), with its training config attached as `model.train_config`.

    `tokenizer` overrides keys of the checkpoint's tokenizer config, e.g. {"path": folder}
    where its tokenizer has moved, {"allow_changed": True} to use one whose files changed
    since the checkpoint was made (refused otherwise: tokenization/digest.py)."""
    from mm_moe.checkpoint.pretrained import find_step_dir

    for attempt in range(_ATTEMPTS):
        step_dir = find_step_dir(path)
        try:
            model, cfg = _load(step_dir, tokenizer)
            break
        except (UserError, OSError) as exc:
            if step_dir.is_dir() and (step_dir / META).is_file():
                raise  # the checkpoint is there: the error is about it
            # A running run pruned it (checkpoint.keep_last) after `latest` named it.
            gone = f"{step_dir} was removed while it was being loaded ({exc.__class__.__name__})"
            if attempt + 1 == _ATTEMPTS or Path(path).resolve() == step_dir.resolve():
                raise UserError(
                    f"{gone}: a run writing checkpoints there prunes old steps "
                    "(checkpoint.keep_last); name a step it keeps, or try again"
                ) from exc
            log.info("%s; loading the run's latest step again", gone)
    vocab = _vocab(step_dir, cfg)
    if tokenizer and vocab is not None:
        _check_same_vocabulary(step_dir, cfg, vocab)
    if vocab is not None:
        model.set_vocab(vocab)  # modality ids derived from input ids when not given
    return model.to(device).eval()


_ATTEMPTS = 3


def _load(step_dir: Path, tokenizer: dict | None):
    from mm_moe.checkpoint.pretrained import load_weights

    cfg = _train_config(step_dir, tokenizer)
    model = cfg.model.build(cfg.moe)
    load_weights(step_dir, model)
    model.train_config = cfg
    return model, cfg


def _vocab(step_dir: Path, cfg):
    """The vocabulary the checkpoint recorded; else the one its config's data builds."""
    from mm_moe.tokenization.vocab import Vocab

    if (step_dir / VOCAB).is_file():
        return Vocab.load(step_dir / VOCAB)
    try:
        return cfg.data.vocab(cfg.tokenizer)
    except (UserError, OSError) as exc:  # tokenizer artifacts moved: modality all text
        log.warning("%s: no vocabulary (%s); modality ids default to text", step_dir, exc)
        return None


def _check_same_vocabulary(step_dir: Path, cfg, vocab) -> None:
    """A tokenizer given in place of the checkpoint's (moved, or changed files with
    tokenizer.allow_changed) must make the vocabulary the weights were trained on: another
    size is other ids for every row (sampling would fail on the shapes, or read garbage)."""
    try:
        size = cfg.data.vocab(cfg.tokenizer).size
    except (UserError, OSError):
        return  # cannot be read here: the tokenizer's own loading says why when it is used
    if size != vocab.size:
        raise UserError(
            f"tokenizer.path={cfg.tokenizer.path}: its vocabulary has {size} ids, the "
            f"checkpoint's {vocab.size} ({step_dir}): these weights need the tokenizer they "
            "were trained with (tokenizer.allow_changed accepts changed files that keep the "
            "vocabulary)"
        )


def load_tokenizers(path: str | Path, tokenizer: dict | None = None):
    """The text and image tokenizers and the vocabulary of a run, checkpoint or upcycled
    model: `.text_ids(text)`, `.image_token_ids(image)` (vocabulary ids, raster order, without
    begin/end-of-image), `.vocab`. `tokenizer` as in `load_pretrained`."""
    from mm_moe.checkpoint.pretrained import find_step_dir

    return _train_config(find_step_dir(path), tokenizer).tokenizer.build()


def _launch_relative(step_dir: Path, cfg, path: str) -> str:
    """A relative path of the training config (tokenizer.path=tokenizers/demo) is relative to
    where the training was started: found from any working folder where the checkpoint sits
    below its relative checkpoint.dir (runs/demo/checkpoints/step_...)."""
    if not path or Path(path).is_absolute() or Path(path).exists():
        return path
    saved_root = Path(cfg.checkpoint.dir)
    root = step_dir.resolve().parent
    if saved_root.is_absolute() or root.parts[-len(saved_root.parts) :] != saved_root.parts:
        return path
    launched = Path(*root.parts[: -len(saved_root.parts)])
    return str(launched / path) if (launched / path).exists() else path


def _vocab_file(step_dir: Path, cfg) -> str:
    """tokenizer.vocab, the layout file a run read its ids by (an upcycle's OUT/vocab.yaml),
    or where that has moved or gone, the copy every checkpoint keeps in its step folder."""
    recorded = _launch_relative(step_dir, cfg, cfg.tokenizer.vocab)
    own = step_dir / VOCAB
    if recorded and not Path(recorded).is_file() and own.is_file():
        log.info("tokenizer.vocab=%s is not there: reading the layout from %s", recorded, own)
        return str(own)
    return recorded


def _train_config(step_dir: Path, tokenizer: dict | None):
    """The checkpoint's training config, its tokenizer keys overridden by `tokenizer`, and
    that tokenizer checked against the digest the checkpoint recorded."""
    from mm_moe.checkpoint.layout import read_config, read_meta
    from mm_moe.config import TrainConfig, from_dict
    from mm_moe.config.legacy import upgrade_saved_config
    from mm_moe.config.validate import to_dict
    from mm_moe.tokenization.config import TokenizerConfig
    from mm_moe.tokenization.digest import check

    saved = read_config(step_dir)
    cfg = from_dict(TrainConfig, upgrade_saved_config(saved))
    if not (tokenizer or {}).get("path"):
        cfg.tokenizer.path = _launch_relative(step_dir, cfg, cfg.tokenizer.path)
    if not (tokenizer or {}).get("vocab"):
        cfg.tokenizer.vocab = _vocab_file(step_dir, cfg)
    if tokenizer:
        merged = {**to_dict(cfg.tokenizer), **tokenizer}
        cfg.tokenizer = from_dict(TokenizerConfig, merged, "tokenizer")
    recorded = read_meta(step_dir).get("tokenizer_digest")
    check(recorded, cfg.tokenizer, f"checkpoint {step_dir}")
    return cfg
