"""Tokenize shards offline into `tokens` shards:
`python data_pipelines/pretokenize.py input=SHARDS format=pairs output=DIR [tokenizer.grid=4 ...]`.

The logic lives in mm_moe/data/builders/pretokenize.py; `--help` lists the keys.
"""

from mm_moe.data.builders.pretokenize import main

if __name__ == "__main__":
    main()
