"""Compile the bytecode of what `make train` imports, on a core the caller leaves idle.

    .venv/bin/python scripts/precompile_imports.py

`make setup` installs packages with `pip --no-compile`: byte-compiling every file of every
package took a minute of the demo's ten. Python then compiles a module each time a process
imports it without bytecode, which the demo's processes (the VQ-VAE training, both training
ranks, their data workers, the report) would do on the critical path, every time where
PYTHONDONTWRITEBYTECODE is set (as on this project's machines). This imports what they import,
writing the bytecode whatever that variable says (as pip's own compile step does); the
Makefile runs it beside the single-threaded corpus build. A module that fails to import is
skipped: this only saves time.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import warnings

sys.dont_write_bytecode = False  # before any import below: each writes its bytecode

# What the tokenizers, the trainer and the report import, beyond mm_moe's own modules.
THIRD_PARTY = [
    "torch",
    "torch.distributed",
    "torch.distributed.run",
    "torch.utils.data",
    "torch.nn.attention.flex_attention",
    "numpy",
    "PIL.Image",
    "sentencepiece",
    "webdataset",
    "hydra",
    "omegaconf",
    "deepspeed",
    "wandb",
    "matplotlib.pyplot",
]


def main() -> None:
    if sys.argv[1:]:  # it takes no arguments: --help (or anything) prints what it does
        print(__doc__)
        raise SystemExit(0 if sys.argv[1] in ("-h", "--help") else 2)
    t0 = time.perf_counter()
    warnings.simplefilter("ignore")
    import mm_moe

    own = [
        m.name
        for m in pkgutil.walk_packages(mm_moe.__path__, "mm_moe.")
        if not m.name.endswith(".__main__")  # importing one runs its command
    ]
    failed = []
    try:
        from mm_moe.parallel.megatron_state import parallel_state

        parallel_state()  # what the trainer imports of megatron-core (not its __init__)
    except BaseException:  # noqa: BLE001
        failed.append("megatron.core.parallel_state")
    for name in THIRD_PARTY + own:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 (an optional extra missing, a module that exits)
            failed.append(name)
    print(
        f"precompiled the imports of {1 + len(THIRD_PARTY) + len(own) - len(failed)} modules in "
        f"{time.perf_counter() - t0:.1f}s" + (f" (skipped {', '.join(failed)})" if failed else "")
    )


if __name__ == "__main__":
    main()
