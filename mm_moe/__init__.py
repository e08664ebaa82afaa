"""mm_moe: distributed pre-training of early-fusion multimodal Mixture-of-Experts models."""


def load_pretrained(path, device="cpu"):
    """A trained model from a checkpoint (step, checkpoint or run directory), in eval mode."""
    from mm_moe.api import load_pretrained as _load

    return _load(path, device)


def load_tokenizers(path):
    """The tokenizers and vocabulary of a run, checkpoint or upcycled model: `.text_ids(text)`,
    `.image_token_ids(image)`, `.vocab`."""
    from mm_moe.api import load_tokenizers as _load

    return _load(path)


__all__ = ["load_pretrained", "load_tokenizers"]
