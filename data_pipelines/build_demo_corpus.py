"""Build the demo corpus into webdataset shards (logic: mm_moe/data/builders/demo.py).

python data_pipelines/build_demo_corpus.py output=data/demo [heldout=500] [overwrite=true]
"""

import logging
import sys

from mm_moe.data.builders.cli import parse
from mm_moe.data.builders.demo import DemoCorpusConfig, build


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(parse(DemoCorpusConfig, sys.argv[1:] if argv is None else argv, "build_demo_corpus"))


if __name__ == "__main__":
    main()
