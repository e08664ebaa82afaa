"""Upcycling: a dense checkpoint (this project's, or a Hugging Face Llama-family folder) into a
MoE / MoMa / MoT checkpoint, and `verify=true` against the source.

    python -m mm_moe.upcycle source=PATH source_format=native|hf out=PATH [options] [overrides]

mm_moe/upcycle_command.py (with the other entry points) parses the command line; here,
upcycling.py writes the checkpoint (ops.py: the tensor operations), hf_import.py reads Hugging
Face folders, verify.py compares logits.
"""
