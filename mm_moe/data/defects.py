"""The kinds of bad data the webdataset pipeline recognizes, and the error that carries one.

Every reason has a counter `data/skipped_<reason>` that is always reported (zero when nothing
was skipped), so the keys are the same on every rank and in every run.
"""

from __future__ import annotations

from mm_moe.errors import UserError

REASONS = (
    "corrupt_image",  # an image member that Pillow cannot decode (or only partly)
    "missing_image",  # a pairs sample without an image, or an interleaved entry naming no member
    "missing_text",  # a pairs/text sample without `.txt`, an interleaved one without `.json`
    "empty_text",  # text that is empty or only whitespace
    "bad_utf8",  # text that is not valid UTF-8
    "split_key",  # a key seen earlier in the shard (members not adjacent), or a repeated member
    "truncated_tar",  # the tar stream ended or broke mid-way; the rest of the shard is lost
    "unreadable_shard",  # the shard could not be opened or is not a tar at all
    "small_image",  # shorter side below data.min_image_side
    "aspect_ratio",  # longer / shorter side above data.max_aspect_ratio
    "bad_json",  # an interleaved document whose JSON is invalid or breaks the schema
    "bad_tokens",  # a tokens sample with missing, mismatched or out-of-vocabulary arrays
)


# The detail of a `split_key` sample, with the usual cause and its fix.
SPLIT_KEY = (
    "its members are not adjacent in the tar (its key was met earlier in the shard, or a "
    "member repeats): a plain `tar cf` of a folder stores files in directory order; write "
    "shards with `tar --sort=name` or data_pipelines/build_*.py"
)


def counter_key(reason: str) -> str:
    return f"data/skipped_{reason}"


class SampleError(Exception):
    """One sample (or the rest of one shard) is unusable, for `reason` (one of REASONS)."""

    def __init__(self, reason: str, detail: str, key: str | None = None, index: int | None = None):
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason, self.detail, self.key = reason, detail, key
        self.index = index  # a broken shard's: the raw sample index the break cost


class DataError(UserError):
    """Bad data under data.on_error=raise, or a source that yields nothing usable."""


def worker_stopped(detail: str) -> DataError:
    """A dataloader worker died (the OOM killer, most often): its streams' positions are gone,
    and the run stops saying what likely killed it and what continues it."""
    return DataError(
        f"a data worker stopped ({detail}): often memory, from data.num_workers or "
        "data.image_cache_size; checkpoint.resume=auto continues exactly from the last "
        "checkpoint"
    )
