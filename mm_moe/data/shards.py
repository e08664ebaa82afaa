"""Shard lists: expanding `data.sources[i].urls`, opening a shard, and dealing shards to streams.

A stream reads *units*: a whole shard, or, when a source has fewer shards than there are
streams, one of `parts` interleaved slices of a shard (samples with index % parts == part), so
every stream has data of every source. The units are dealt to streams once, by a permutation
seeded with (seed, source); each epoch a stream walks its own units in an order seeded with
(seed, source, stream, epoch). Nothing here depends on world size or worker count.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from braceexpand import braceexpand

from mm_moe.errors import UserError

log = logging.getLogger(__name__)

_ASSIGN_TAG, _EPOCH_TAG = 0x5A5D, 0xE90C


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_urls(urls: str | list[str], key: str) -> list[str]:
    """Brace patterns, local globs and directories (the shards directly inside: SHARD_SUFFIXES)
    to a list of shards.

    `key` names the config entry in error messages."""
    entries = [urls] if isinstance(urls, str) else list(urls)
    shards: list[str] = []
    for entry in entries:
        if not entry or not entry.strip():
            raise UserError(f"{key}: an empty shard pattern")
        for url in braceexpand(entry):
            if is_remote(url):
                shards.append(url)
            elif os.path.isdir(url):
                found = _folder_shards(url, key)
                if not found:
                    loose = sorted(e.name for e in os.scandir(url) if e.is_file())
                    raise UserError(
                        f"{key}: directory {url} holds no shards ({', '.join(SHARD_SUFFIXES)})"
                        + (
                            f" but {len(loose)} loose file(s) (e.g. {loose[0]}){BUILD}"
                            if loose
                            else ""
                        )
                    )
                shards += found
            elif any(c in url for c in "*?["):
                found = sorted(glob.glob(url))
                if not found:
                    raise UserError(f"{key}: pattern {url} matches no files")
                shards += found
            elif not os.path.isfile(url):
                raise UserError(f"{key}: shard {url} does not exist")
            elif not _is_shard(url) and not tarfile.is_tarfile(url):
                raise UserError(f"{key}: {url} is not a shard (a tar file){BUILD}")
            else:
                shards.append(url)
    unique = list(dict.fromkeys(shards))  # a shard named twice (a folder and a glob) once
    if len(unique) < len(shards):
        log.warning(
            "%s: %d shard(s) named more than once by the urls are read once per epoch",
            key,
            len(shards) - len(unique),
        )
    log.info("%s: %d shard(s)", key, len(unique))
    return unique


# What a folder url reads (any case): plain and gzipped tars.
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BUILD = (
    ": shards are webdataset tar files, built from images, captions, text files or JSONL "
    "with data_pipelines/build_pairs.py, build_text.py or build_interleaved.py (docs/data.md)"
)


def _is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def _folder_shards(folder: str, key: str) -> list[str]:
    """The shards directly in `folder`; its subfolders are not read, and are named in a
    warning when they hold shards."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    nested = [e.path for e in entries if e.is_dir() and any(map(_is_shard, os.listdir(e.path)))]
    if nested:
        log.warning(
            "%s: directory %s: its subfolders are not read, and %s holds shards: list them in "
            "the urls too (or a glob)",
            key,
            folder,
            nested[0] if len(nested) == 1 else f"{nested[0]} (and {len(nested) - 1} more)",
        )
    return [e.path for e in entries if e.is_file() and _is_shard(e.name)]


def open_shard(url: str):
    """A binary file object; `pipe:CMD` runs CMD in a shell (configs must be trusted), its
    exit status checked when it is closed (`_StatusAtClose`)."""
    stream = wds.gopen(url, "rb")
    return _StatusAtClose(stream) if url.startswith("pipe:") else stream


class _StatusAtClose:
    """A `pipe:` shard's output read to its end before the command's exit status is checked
    (at close, where a failure still counts against the shard): webdataset's Pipe checks it on
    every read and drops the bytes of the read that saw the exit, so a command that wrote a
    whole tar and then failed lost a tail whose size depended on timing."""

    def __init__(self, pipe):
        self.pipe = pipe

    def read(self, *args):
        return self.pipe.stream.read(*args)

    def close(self) -> None:
        self.pipe.close()  # waits for the command; a failure status raises OSError


@dataclass(frozen=True)
class Unit:
    shard: int  # index into the source's shard list
    part: int
    parts: int


def source_units(num_shards: int, num_streams: int) -> list[Unit]:
    """Every unit of a source, in shard order: together they hold each sample once."""
    assert num_shards > 0
    parts = -(-num_streams // num_shards) if num_shards < num_streams else 1
    return [Unit(s, p, parts) for s in range(num_shards) for p in range(parts)]


def assign_units(num_shards: int, num_streams: int, seed: int, source: int) -> list[list[Unit]]:
    """The units of each stream, fixed for the whole run."""
    units = source_units(num_shards, num_streams)
    order = np.random.default_rng([seed, source, _ASSIGN_TAG]).permutation(len(units))
    return [[units[i] for i in order[j::num_streams]] for j in range(num_streams)]


def uneven_share(num_shards: int, num_streams: int) -> tuple[int, int] | None:
    """(most, fewest) units a stream of a source reads, where they differ: every stream gives
    the same number of rows a step, so a stream with fewer units (a smaller share of the
    source's samples) repeats its samples more often. None where the share is even."""
    units = len(source_units(num_shards, num_streams))
    most, fewest = -(-units // num_streams), units // num_streams
    return (most, fewest) if most != fewest else None


def epoch_order(num_units: int, seed: int, source: int, stream: int, epoch: int) -> list[int]:
    """The order in which a stream walks its units in `epoch`."""
    rng = np.random.default_rng([seed, source, stream, epoch, _EPOCH_TAG])
    return rng.permutation(num_units).tolist()


TOKENIZER_RECORD = "tokenizer.yaml"
# Tokenizer config keys that are places or switches, not what the ids are: a moved tokenizer
# is the same tokenizer (its files are compared through the recorded digest).
_PLACES = ("path", "vocab", "allow_changed", "digest")


def tokenizer_record(tokenizer) -> dict:
    """What pretokenize writes to tokenizer.yaml beside the shards: the tokenizer config and
    the content digest of its files (mm_moe/tokenization/digest.py)."""
    from mm_moe.config.validate import to_dict
    from mm_moe.tokenization.digest import tokenizer_digest

    return {**to_dict(tokenizer), "digest": tokenizer_digest(tokenizer)}


def _settings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in _PLACES}


def check_tokens_vocab(shards: list[str], tokenizer, vocab, key: str) -> None:
    """Refuse local tokens shards whose vocab.yaml or tokenizer.yaml (written by pretokenize)
    differ from the run's vocabulary, tokenizer settings or tokenizer files (by digest: the
    folder it was read from may have moved)."""
    import yaml

    from mm_moe.config.validate import to_dict
    from mm_moe.tokenization import digest
    from mm_moe.tokenization.vocab import Vocab

    remote = sorted({s for s in shards if is_remote(s)})
    if remote:
        log.warning(
            "%s: tokens shards read from %s%s are not checked against the run's tokenizer "
            "(only local folders' vocab.yaml and %s are): their ids must come from the same "
            "tokenizer",
            key,
            remote[0],
            f" and {len(remote) - 1} more" if len(remote) > 1 else "",
            TOKENIZER_RECORD,
        )
    for folder in sorted({os.path.dirname(s) for s in shards if not is_remote(s)}):
        path = os.path.join(folder, "vocab.yaml")
        if os.path.isfile(path) and (theirs := Vocab.load(path)) != vocab:
            raise UserError(
                f"{key}: {path} ({theirs}) is not the vocabulary of the run's tokenizer "
                f"({vocab}); pretokenize again with the same tokenizer settings"
            )
        path = os.path.join(folder, TOKENIZER_RECORD)
        missing = [
            n
            for n in ("vocab.yaml", TOKENIZER_RECORD)
            if not os.path.isfile(os.path.join(folder, n))
        ]
        if missing:
            log.warning(
                "%s: the tokens shards in %s have no %s beside them (pretokenize writes them): "
                "their ids are not checked against the run's tokenizer. Copy those files "
                "with the shards, or make sure they were pretokenized with this tokenizer",
                key,
                folder,
                " or ".join(missing),
            )
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            theirs = yaml.safe_load(f)
        if not isinstance(theirs, dict):
            raise UserError(f"{key}: {path} is not a tokenizer record (a YAML mapping)")
        if _settings(theirs) != _settings(ours := to_dict(tokenizer)):
            raise UserError(
                f"{key}: {path} ({_settings(theirs)}) is not the run's tokenizer config "
                f"({_settings(ours)}); pretokenize again with the same tokenizer settings"
            )
        digest.check(theirs.get("digest"), tokenizer, f"{key}: the token shards in {folder}")
