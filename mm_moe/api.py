"""The public Python API: `mm_moe.load_pretrained` and `mm_moe.load_tokenizers`.

The top of the import stack (an entry point, like the command lines): library packages take
the loader from mm_moe/eval/pretrained.py instead."""

from mm_moe.eval.pretrained import load_pretrained, load_tokenizers

__all__ = ["load_pretrained", "load_tokenizers"]
