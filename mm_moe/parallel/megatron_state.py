"""megatron-core's `parallel_state` (the process groups), without the package's start-up cost.

`megatron/core/__init__.py` imports tensor_parallel, the distributed optimizer, inference and the
Transformer Engine probes: 5-7 s of every training process's start on a CPU, for a package of
which mm_moe uses one module. `parallel_state()` imports that module under a `megatron.core`
whose `__init__` has not run yet, and runs it the first time anything else of the package is
asked for (PEP 562's module `__getattr__`), so other code that imports `megatron.core` still
sees the whole package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from mm_moe.errors import UserError


def parallel_state() -> ModuleType:
    if "megatron.core" not in sys.modules:
        spec = importlib.util.find_spec("megatron.core") if _has_megatron() else None
        if spec is None or spec.loader is None or not spec.submodule_search_locations:
            raise UserError(
                "expert parallelism needs megatron-core's parallel_state: "
                "pip install megatron-core (or `make setup`)"
            )
        package = importlib.util.module_from_spec(spec)
        package.__getattr__ = _run_init_on_first_use(package, spec)
        sys.modules["megatron.core"] = package
        sys.modules["megatron"].core = package
    return importlib.import_module("megatron.core.parallel_state")


def _has_megatron() -> bool:
    try:
        return importlib.util.find_spec("megatron") is not None
    except ImportError:
        return False


def _run_init_on_first_use(package: ModuleType, spec):
    def __getattr__(name: str):
        if name.startswith("__"):  # probes (`__file__`, `__wrapped__`...) need no __init__
            raise AttributeError(name)
        submodule = f"{package.__name__}.{name}"
        if importlib.util.find_spec(submodule) is not None:  # `from megatron.core import utils`
            return importlib.import_module(submodule)
        del package.__getattr__  # once: the package's own names take over
        spec.loader.exec_module(package)
        return getattr(package, name)

    return __getattr__
