"""Raw samples of one shard, in order, with the defects of the tar layout flagged.

A raw sample is the run of adjacent tar members sharing a key (`KEY.jpg`, `KEY.txt`, ...;
the key is everything before the first dot of the file name). Its `index` counts raw samples
from the start of the shard: the loader's resume position is such an index, so reading must be
deterministic, and every raw sample gets an index whether it turns out usable or not.

Layout defects do not stop the shard:
- a key met again later in the shard (members not adjacent), or a member repeated inside one
  sample, flags that sample `split_key`;
- a tar that breaks mid-way raises `SampleError("truncated_tar")` after the samples before the
  break; the sample being read when it broke is dropped (it may be incomplete), unless the
  broken member already belongs to the next key. A tar is whole only when it ends with its
  end-of-archive blocks (two zero blocks): `tarfile` ends quietly on a stream cut at a member
  boundary or inside a header (also under gzip or `pipe:`), so that is checked here;
- a shard that cannot be opened or read at all raises `SampleError("unreadable_shard")`;
- a `pipe:` command that fails after writing a whole tar raises `SampleError("truncated_tar")`
  after all of its samples.
"""

from __future__ import annotations

import contextlib
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext

from mm_moe.data.defects import SampleError
from mm_moe.data.shards import open_shard
from mm_moe.errors import UserError

# webdataset's convention: names like __meta__ or __index__/ hold no samples.
_META = re.compile(r"__[^/]*__($|/)")
# What a broken or cut tar stream raises (gzip and pipes add their own).
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


@dataclass
class RawSample:
    key: str
    index: int
    members: dict[str, bytes] = field(default_factory=dict)
    defect: str | None = None  # "split_key" when the tar layout is broken around this key


class _CutShort(tarfile.ReadError):
    """The tar stream ended (or met a bad header) before its end-of-archive blocks."""


def _header_recorder(last_block: list[bytes]) -> type[tarfile.TarInfo]:
    """A TarInfo class that keeps the last header block tarfile read (its end-of-archive check
    happens inside `frombuf`, and a cut stream ends the iteration without an error)."""

    class _Recording(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf, encoding, errors):
            last_block[0] = buf
            return super().frombuf(buf, encoding, errors)

    return _Recording


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


class _FailedAtClose(OSError):
    """The tar was whole, but closing its source failed (a `pipe:` command's exit status)."""


class _BrokenMember(Exception):
    """Reading the data of member `name` failed (its header was fine)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular members, like webdataset's tar_file_iterator, but telling a
    broken member (its name is known) from a broken header (nothing is known)."""
    fileobj = open_shard(url)
    completed, last_block = False, [b""]
    try:
        tarinfo = _header_recorder(last_block)
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=tarinfo) as stream:
            for info in stream:
                if not info.isreg() or _META.match(info.name):
                    continue
                try:
                    data = stream.extractfile(info).read()
                except _TAR_ERRORS as exc:
                    raise _BrokenMember(info.name) from exc
                yield info.name, data
                stream.members = []  # stream mode keeps every header otherwise
            # The iteration stopped at a zero block; the second one must follow.
            if last_block[0] != _ZERO_BLOCK or stream.fileobj.read(len(_ZERO_BLOCK)) != _ZERO_BLOCK:
                raise _CutShort("the tar ends without its end-of-archive blocks (cut short)")
        completed = True
    finally:
        if completed:
            try:
                fileobj.close()  # a `pipe:` command's failure status raises here
            except _TAR_ERRORS as exc:
                raise _FailedAtClose(str(exc)) from exc
        else:
            # Abandoned (or already failing): a pipe cut short exits with SIGPIPE; ignore it.
            with contextlib.suppress(Exception):
                fileobj.close()


def iter_raw_samples(url: str) -> Iterator[RawSample]:
    """Raw samples of the shard at `url`; see the module docstring for errors."""
    seen: set[str] = set()
    current: RawSample | None = None
    index, members_read = 0, 0
    try:
        for name, data in _members(url):
            members_read += 1
            key, ext = base_plus_ext(name)
            if key is None:
                continue  # a member without an extension belongs to no sample
            ext = ext.lower()
            if current is not None and key == current.key:
                if ext in current.members:
                    current.defect = "split_key"
                current.members[ext] = data
                continue
            if current is not None:
                yield current
            current = RawSample(key, index, {ext: data})
            index += 1
            if key in seen:
                current.defect = "split_key"
            seen.add(key)
    except (*_TAR_ERRORS, _BrokenMember) as exc:
        broken = exc.name if isinstance(exc, _BrokenMember) else None
        cause = exc.__cause__ if broken else exc
        whole = isinstance(exc, _FailedAtClose)
        if current is not None and (whole or broken and base_plus_ext(broken)[0] != current.key):
            yield current  # the break is in the next sample (or after the end): it is complete
            current = None
        where = f"reading member {broken!r}" if broken else "reading a member header"
        where = "after the tar's end, closing it" if whole else where
        opened = members_read or broken or isinstance(exc, _CutShort)
        reason = "truncated_tar" if opened else "unreadable_shard"
        raise SampleError(
            reason,
            f"{cause.__class__.__name__}: {cause} ({where}, {index} samples started)",
            key=base_plus_ext(broken)[0] if broken else current.key if current else None,
            index=current.index if current is not None else index,
        ) from exc
    if current is not None:
        yield current


def iter_whole_shard(url: str, key: str) -> Iterator[RawSample]:
    """`iter_raw_samples` for readers without `data.on_error` (tokenizer training, the labelled
    evaluation set): a cut or unreadable shard is a `UserError` naming it and the config `key`,
    not a quietly shorter corpus."""
    try:
        yield from iter_raw_samples(url)
    except SampleError as exc:
        raise UserError(f"{key}: shard {url} is broken ({exc.reason}): {exc.detail}") from exc
