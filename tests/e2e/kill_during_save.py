"""Run `mm_moe.train`, but SIGKILL the process in the middle of writing the checkpoint of
step $KILL_AT_STEP: after its tensors are on disk, before it is complete."""

import os
import signal
import sys

import torch

_real_save = torch.save
_marker = f"step_{int(os.environ['KILL_AT_STEP']):08d}"


def _save_then_die(obj, f, *args, **kwargs):
    _real_save(obj, f, *args, **kwargs)
    if _marker in str(f) and str(f).endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)


torch.save = _save_then_die

if __name__ == "__main__":
    from mm_moe.train import main

    sys.argv[0] = "mm_moe.train"
    main()
