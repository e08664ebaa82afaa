"""Export a run or checkpoint to a Hugging Face folder:

    python -m mm_moe.export source=RUN_OR_CHECKPOINT out=DIR [overwrite=true] [max_shard_mb=5000]

Dense models become `llama`, `qwen3` (QK-norm) or `chameleon` (Chameleon's vocabulary and
QK-norm); one-group token-choice softmax top-k renormalized MoE models become `mixtral`.
MoMa, MoT, expert-choice and mixture-of-depths models are refused with the reason
(mm_moe/upcycle/hf_export.py). The folder loads with transformers' from_pretrained.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mm_moe.cli import exits_on_failure, parse_args, setup_logging
from mm_moe.errors import UserError

PROG = "mm_moe.export"
log = logging.getLogger("mm_moe")


@dataclass
class ExportConfig:
    source: str
    out: str
    overwrite: bool = False
    # Largest safetensors shard; bigger models are split, with model.safetensors.index.json.
    max_shard_mb: float = 5000.0

    def __post_init__(self) -> None:
        if self.max_shard_mb <= 0:
            raise UserError(f"max_shard_mb={self.max_shard_mb} must be positive")


def run(cfg: ExportConfig) -> str:
    from mm_moe.api import load_pretrained
    from mm_moe.upcycle.hf_export import export

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(f"out={out} is not empty; pass overwrite=true to replace it")
        shutil.rmtree(out)
    model = load_pretrained(cfg.source)
    kind = export(model, out, int(cfg.max_shard_mb * 2**20))
    log.info("exported %s as a Hugging Face %s model to %s", cfg.source, kind, out)
    return kind


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_args(ExportConfig, sys.argv[1:] if argv is None else argv, PROG)
    with exits_on_failure(PROG):
        run(cfg)


if __name__ == "__main__":
    main()
