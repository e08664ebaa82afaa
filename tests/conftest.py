import os

# Tests run offline and quietly; wandb is switched on explicitly where a test checks it.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
