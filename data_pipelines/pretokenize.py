"""Tokenize shards offline into `tokens` shards:
`python data_pipelines/pretokenize.py input=SHARDS format=pairs output=DIR [tokenizer.grid=4 ...]`.

The logic lives in mm_moe/data/builders/pretokenize.py; `--help` lists the keys.
"""

from mm_moe.cli import run_job
from mm_moe.data.builders.pretokenize import PretokenizeConfig, build

if __name__ == "__main__":
    pattern = run_job("pretokenize.py", PretokenizeConfig, build)
    print(f"wrote {pattern}  (data.sources: {{urls: {pattern!r}, format: tokens}})")
