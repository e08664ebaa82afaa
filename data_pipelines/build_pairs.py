"""Build pairs shards: `python data_pipelines/build_pairs.py input=... output=... [key=value ...]`.

The logic lives in mm_moe/data/builders/pairs.py; `--help` lists the keys.
"""

from mm_moe.data.builders.pairs import main

if __name__ == "__main__":
    main()
