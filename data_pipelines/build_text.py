"""Build text shards: `python data_pipelines/build_text.py input=... output=... [key=value ...]`.

The logic lives in mm_moe/data/builders/text.py; `--help` lists the keys.
"""

from mm_moe.cli import run_job
from mm_moe.data.builders.text import BuildTextConfig, build

if __name__ == "__main__":
    pattern = run_job("build_text.py", BuildTextConfig, build)
    print(f"wrote {pattern}  (data.sources: {{urls: {pattern!r}, format: text}})")
