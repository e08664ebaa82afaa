"""Model weights from a checkpoint directory, for inference (`mm_moe.load_pretrained`).

`path` may be a step directory (step_XXXXXXXX/), a checkpoint directory with a `latest`
pointer, a run directory holding checkpoints/, or a weights-only checkpoint written by
`python -m mm_moe.upcycle` (experts are stored one entry each, so any expert-parallel size).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mm_moe.checkpoint import layout, tensors
from mm_moe.errors import UserError


def find_step_dir(path: str | Path) -> Path:
    """The step directory `path` names: a step directory, a checkpoint directory (its latest
    step), a run directory (its checkpoints' latest), or the `latest` pointer file itself."""
    path = Path(path)
    if path.name == layout.LATEST and path.is_file():
        path = path.parent
    for candidate in (path, path / "checkpoints"):
        if (candidate / layout.META).is_file():
            return candidate
        if candidate.is_dir():
            found = layout.latest_step_dir(candidate)
            if found is not None:
                return found
    run_folder = (path / "metrics.jsonl").is_file() and not (path / "checkpoints").is_dir()
    raise UserError(
        f"no checkpoint at {path}: expected a step_XXXXXXXX directory, a "
        f"checkpoint directory with '{layout.LATEST}', or a run directory"
        + (
            " holding checkpoints/; this run folder has none: its checkpoint.dir was set "
            "elsewhere (give that folder), or it saved none (checkpoint.interval=0)"
            if run_folder
            else ""
        )
    )


def load_weights(step_dir: Path, model: torch.nn.Module) -> None:
    """The step's model weights into `model` (built from the step's config), every tensor
    accounted for: derived buffers (RoPE) are not saved, tied weights are saved once."""
    state = tensors.read_model(step_dir, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    rope = {n for n in missing if "rope" in n}
    # Tied weights are saved once, under their first name (lm_head.weight is embed.weight).
    aliases = set(dict(model.named_parameters(remove_duplicate=False))) - set(
        dict(model.named_parameters())
    )
    missing = set(missing) - rope - aliases
    if missing or unexpected:
        raise UserError(
            f"{step_dir}/model.pt does not match its config: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
