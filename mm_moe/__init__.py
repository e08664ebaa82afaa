"""mm_moe: distributed pre-training of early-fusion multimodal Mixture-of-Experts models."""


def load_pretrained(path, device="cpu", tokenizer=None):
    """A trained model from a checkpoint (step, checkpoint or run directory), in eval mode.
    `tokenizer`: overrides of its tokenizer config, e.g. {"path": where it moved}."""
    from mm_moe.api import load_pretrained as _load

    return _load(path, device, tokenizer)


def load_tokenizers(path, tokenizer=None):
    """The tokenizers and vocabulary of a run, checkpoint or upcycled model: `.text_ids(text)`,
    `.image_token_ids(image)`, `.vocab`. `tokenizer` as in `load_pretrained`."""
    from mm_moe.api import load_tokenizers as _load

    return _load(path, tokenizer)


__all__ = ["load_pretrained", "load_tokenizers"]
