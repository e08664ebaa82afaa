"""mm_moe: distributed pre-training of early-fusion multimodal Mixture-of-Experts models."""


def load_pretrained(path, device="cpu"):
    """A trained model from a checkpoint (step, checkpoint or run directory), in eval mode."""
    from mm_moe.api import load_pretrained as _load

    return _load(path, device)


__all__ = ["load_pretrained"]
