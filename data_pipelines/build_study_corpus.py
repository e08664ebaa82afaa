"""Build the study corpus, where no training image repeats (issue 31, [moma-gap]):

    python data_pipelines/build_study_corpus.py output=DIR pairs=N seed=S
        [tokenizers=tokenizers/demo] [heldout=500] [deform.alpha=34 ...] [overwrite=true]

Writes DIR/pairs (N pairs, each image a distinct mild deformation of a training digit),
DIR/heldout (the demo corpus's held-out digits, undeformed), DIR/heldout_deformed, DIR/pairs_tokens
(pretokenized, where the tokenizers exist), DIR/grid.png and DIR/manifest.json. The logic lives
in mm_moe/data/builders/study_corpus.py; `--help` lists the keys.
"""

from mm_moe.cli import run_job
from mm_moe.data.builders.study_corpus import StudyCorpusConfig, build

if __name__ == "__main__":
    info = run_job("build_study_corpus.py", StudyCorpusConfig, build)
    tokens = info["pretokenized"]
    fmt = "tokens" if tokens else "pairs"
    urls = tokens or info["shards"]["pairs"]
    print(f"wrote {info['pairs']} pairs  (data.sources: {{urls: {urls!r}, format: {fmt}}})")
