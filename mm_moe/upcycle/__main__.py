"""`python -m mm_moe.upcycle`: runs the command, mm_moe/upcycle_command.py (it lives with the
other entry points: a library package imports no entry point)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("mm_moe.upcycle_command", run_name="__main__", alter_sys=True)
