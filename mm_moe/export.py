"""Export a run or checkpoint to a Hugging Face folder:

    python -m mm_moe.export source=RUN_OR_CHECKPOINT out=DIR [overwrite=true] [max_shard_mb=5000]
        [dtype=float32|bfloat16|float16]

Dense models become `llama`, `qwen3` (QK-norm) or `chameleon` (Chameleon's vocabulary and
QK-norm); one-group token-choice softmax top-k MoE models become `mixtral` (renormalized, every
layer) or, with QK-norm, `qwen3_moe`.
MoMa, MoT, expert-choice and mixture-of-depths models are refused with the reason
(mm_moe/upcycle/hf_export.py), and so is an option Mixtral cannot express (the key and the value
it needs named). The folder loads with transformers' from_pretrained; beside config.json it
records this project's vocabulary layout (vocab.yaml, mm_moe_tokenizer.yaml), so that
`python -m mm_moe.upcycle source=DIR source_format=hf` keeps every id where it was.

Every check (paths, source loadable, architecture) comes before anything is removed: the folder
is written beside `out` and renamed into place at the end; a source inside `out` is refused.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mm_moe.cli import exits_on_failure, parse_args, setup_logging
from mm_moe.errors import UserError
from mm_moe.utils.folders import replace_dir, sibling_dir

PROG = "mm_moe.export"
log = logging.getLogger("mm_moe")


@dataclass
class ExportConfig:
    source: str
    out: str
    overwrite: bool = False
    # Largest safetensors shard; bigger models are split, with model.safetensors.index.json.
    max_shard_mb: float = 5000.0
    # The weights' dtype in the folder (and config.json's torch_dtype): training keeps fp32
    # masters; bfloat16 halves the folder, as published checkpoints usually are.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if self.max_shard_mb <= 0:
            raise UserError(f"max_shard_mb={self.max_shard_mb} must be positive")


def _check_paths(source: Path, out: Path, overwrite: bool) -> None:
    """Every refusal about the two paths, before anything is read or removed."""
    src, dst = source.resolve(), out.resolve()
    if dst in {Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve()}:
        raise UserError(f"out={out} is a top-level directory (/, home, the working directory)")
    if src == dst or src.is_relative_to(dst):
        raise UserError(
            f"source={source} lies inside out={out}: replacing out would destroy it; "
            "export to a folder outside the source"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"out={out} is not empty; pass overwrite=true to replace it")


def run(cfg: ExportConfig) -> str:
    """Load and check the source, write the folder beside `out`, then swap it in: a refused
    or failed export leaves a previous export at `out` as it was."""
    from mm_moe.api import load_pretrained
    from mm_moe.upcycle.hf_export import export

    out = Path(cfg.out)
    _check_paths(Path(cfg.source), out, cfg.overwrite)
    model = load_pretrained(cfg.source)
    tmp = sibling_dir(out, "export")
    try:
        kind = export(model, tmp, int(cfg.max_shard_mb * 2**20), cfg.dtype)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful publish
    log.info("exported %s as a Hugging Face %s model to %s", cfg.source, kind, out)
    return kind


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_args(ExportConfig, sys.argv[1:] if argv is None else argv, PROG)
    with exits_on_failure(PROG):
        run(cfg)


if __name__ == "__main__":
    main()
