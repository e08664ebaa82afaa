"""`python -m mm_moe.tokenization.train_image`: the command's name, kept. The command lives with
the other entry points, in mm_moe/train_image_tokenizer.py (its config in tokenization/config.py);
a library module imports no entry point, so this one only runs that module as the program."""

import runpy

if __name__ == "__main__":
    runpy.run_module("mm_moe.train_image_tokenizer", run_name="__main__", alter_sys=True)
