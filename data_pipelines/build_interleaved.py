"""Build interleaved shards:
`python data_pipelines/build_interleaved.py input=DOCS.jsonl output=DIR [key=value ...]`.

The logic lives in mm_moe/data/builders/interleaved.py; `--help` lists the keys.
"""

from mm_moe.data.builders.interleaved import main

if __name__ == "__main__":
    main()
