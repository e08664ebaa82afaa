"""A content digest of the tokenizers: what checkpoints and token shards record, so that a
rebuilt tokenizer (same folder, other files) is noticed and a moved one (same files, other
folder) is not refused.

The digest is sha256 over what decides the ids: the tokenizer kinds, the stand-ins'
parameters, and the bytes of every file the tokenizers and the vocabulary layout are read
from, each under its name inside its folder (never the folder's path). Resume, `generate`,
`load_pretrained` and the token-shard check compare it (`check`); `tokenizer.allow_changed=true`
turns a refusal into a warning.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from mm_moe.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "sha256:"
_CHUNK = 1 << 22


def _text_files(cfg) -> list[Path]:
    from mm_moe.tokenization.hf_text import TOKENIZER_FILES
    from mm_moe.tokenization.sentencepiece_text import MODEL_FILE

    folder = Path(cfg.path)
    if cfg.text == "sentencepiece":
        return [folder / MODEL_FILE]
    if cfg.text == "hf":  # those present: a tokenizer folder holds some of them
        return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return []


def _image_files(cfg) -> list[Path]:
    from mm_moe.tokenization import chameleon_vq
    from mm_moe.tokenization.vq.tokenizer import CONFIG, WEIGHTS

    folder = Path(cfg.path)
    if cfg.image == "vq":
        return [folder / WEIGHTS, folder / CONFIG]
    if cfg.image == "chameleon":
        if (folder / chameleon_vq.VQ_CONFIG).is_file():
            return [folder / chameleon_vq.VQ_CONFIG, folder / chameleon_vq.VQ_WEIGHTS]
        return [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    return []


def _parameters(cfg) -> str:
    """The settings that decide the ids besides the files (the stand-ins have no files)."""
    grid = f",{cfg.image_size},{cfg.grid},{cfg.levels}" if cfg.image == "grid_quantizer" else ""
    return f"text={cfg.text},image={cfg.image}{grid},vocab={'file' if cfg.vocab else 'derived'}"


def tokenizer_files(cfg) -> list[Path]:
    """Every file the tokenizers of `cfg` (a TokenizerConfig) are read from."""
    return [*_text_files(cfg), *_image_files(cfg), *([Path(cfg.vocab)] if cfg.vocab else [])]


def tokenizer_digest(cfg) -> str | None:
    """'sha256:<hex>' of the tokenizers of `cfg`; None when one of their files is missing
    (a run on pre-tokenized shards may not have them)."""
    files = tokenizer_files(cfg)
    if any(not f.is_file() for f in files):
        return None
    sha = hashlib.sha256(_parameters(cfg).encode())
    for path in files:
        sha.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
    return PREFIX + sha.hexdigest()


def check(recorded: str | None, cfg, what: str, current: str | None = None) -> None:
    """Refuse the tokenizers of `cfg` when `what` (a checkpoint, token shards) recorded other
    ones, naming both digests; `cfg.allow_changed` makes it a warning. Nothing recorded (made
    before digests were) or the files not at hand: a log line, no check."""
    if recorded is None:
        log.info(
            "%s records no tokenizer digest (made before digests were recorded, or "
            "without the tokenizer's files at hand): the tokenizer is not compared",
            what,
        )
        return
    current = current if current is not None else tokenizer_digest(cfg)
    if current is None:
        missing = [str(f) for f in tokenizer_files(cfg) if not f.is_file()]
        log.warning(
            "%s: %s of its tokenizer (tokenizer.path=%s) %s missing; the tokenizer is not "
            "compared with the one it recorded",
            what,
            ", ".join(missing),
            cfg.path,
            "is" if len(missing) == 1 else "are",
        )
        return
    if current == recorded:
        return
    message = (
        f"{what}: made with the tokenizer {recorded}, but tokenizer.path={cfg.path} "
        f"(tokenizer.text={cfg.text}, tokenizer.image={cfg.image}"
        f"{f', tokenizer.vocab={cfg.vocab}' if cfg.vocab else ''}) is {current}: other "
        "tokenizer files (another tokenizer, or this folder's rebuilt), so ids would mean other "
        "tokens"
    )
    if cfg.allow_changed:
        log.warning("%s; going on: tokenizer.allow_changed=true", message)
        return
    raise UserError(
        f"{message}. Point tokenizer.path at the tokenizer it was made with, or pass "
        "tokenizer.allow_changed=true to use this one anyway"
    )
