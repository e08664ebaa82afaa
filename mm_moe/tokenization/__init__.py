"""Text and image tokenizers and the unified vocabulary they share."""
