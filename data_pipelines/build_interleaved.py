"""Build interleaved shards:
`python data_pipelines/build_interleaved.py input=DOCS.jsonl output=DIR [key=value ...]`.

The logic lives in mm_moe/data/builders/interleaved.py; `--help` lists the keys.
"""

from mm_moe.cli import run_job
from mm_moe.data.builders.interleaved import BuildInterleavedConfig, build

if __name__ == "__main__":
    pattern = run_job("build_interleaved.py", BuildInterleavedConfig, build)
    print(f"wrote {pattern}  (data.sources: {{urls: {pattern!r}, format: interleaved}})")
