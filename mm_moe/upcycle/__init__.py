"""Upcycling: a dense checkpoint (this project's, or a Hugging Face Llama-family folder) into a
MoE / MoMa / MoT checkpoint, and `verify=true` against the source.

    python -m mm_moe.upcycle source=PATH source_format=native|hf out=PATH [options] [overrides]

command.py parses the command line, upcycling.py writes the checkpoint (ops.py: the tensor
operations), hf_import.py reads Hugging Face folders, verify.py compares logits.
"""


def __getattr__(name: str):
    # The command line (`run`, `main`) is loaded on first use, so that importing the library
    # modules of this package does not load the entry point.
    if name in ("run", "main"):
        from mm_moe.upcycle import command

        return getattr(command, name)
    raise AttributeError(f"module 'mm_moe.upcycle' has no attribute {name!r}")


__all__ = ["main", "run"]
