"""Build text shards: `python data_pipelines/build_text.py input=... output=... [key=value ...]`.

The logic lives in mm_moe/data/builders/text.py; `--help` lists the keys.
"""

from mm_moe.data.builders.text import main

if __name__ == "__main__":
    main()
