"""Build pairs shards: `python data_pipelines/build_pairs.py input=... output=... [key=value ...]`.

The logic lives in mm_moe/data/builders/pairs.py; `--help` lists the keys.
"""

from mm_moe.cli import run_job
from mm_moe.data.builders.pairs import BuildPairsConfig, build

if __name__ == "__main__":
    pattern = run_job("build_pairs.py", BuildPairsConfig, build)
    print(f"wrote {pattern}  (data.sources: {{urls: {pattern!r}, format: pairs}})")
