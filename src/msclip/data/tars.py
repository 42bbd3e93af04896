"""Reading tar shards member by member, telling a clean end from a cut one.

Python's ``tarfile`` ends an iteration silently when the file stops at a header boundary or inside a
header (it only raises at offset 0), so a truncated shard would lose its tail without a word. The reader
here records how the last header read ended: an all-zero block is the archive's end marker, anything else
(no bytes, a short block, an invalid header) means the shard is cut or damaged. A cut inside a member's
data raises ``ShardTruncated`` as well; the samples read before the cut stay usable.
"""
from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import IO, Iterator

from webdataset.tariterators import base_plus_ext

from .formats import WDS_IMAGE_KEYS

log = logging.getLogger(__name__)


class ShardReadError(Exception):
    """A shard could not be opened or parsed; the message names it."""


class ShardTruncated(ShardReadError):
    """A shard ends before its end-of-archive marker; the message names it."""


class _WatchedInfo(tarfile.TarInfo):
    """Records on the TarFile why header reading stopped (``end_reason``): None = the end marker."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            info = super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # an all-zero block: the archive's end marker
            tar.end_reason = None  # type: ignore[attr-defined]
            raise
        except tarfile.EmptyHeaderError:
            tar.end_reason = "truncated at a member boundary (no end-of-archive marker)"  # type: ignore
            raise
        except tarfile.TruncatedHeaderError:
            tar.end_reason = "truncated inside a member header"  # type: ignore[attr-defined]
            raise
        except tarfile.HeaderError as err:
            tar.end_reason = f"invalid member header ({err})"  # type: ignore[attr-defined]
            raise
        tar.end_reason = "unknown"  # type: ignore[attr-defined]  # overwritten by the next header read
        return info


def iter_members(stream: IO[bytes], url: str, read_data: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """``(member name, data or None)`` for each regular file of a tar stream (any compression).

    Raises ``ShardTruncated`` for a cut shard and ``ShardReadError`` for any other damage, after yielding
    every member that was readable before it.
    """
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedInfo)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardReadError(f"{url}: not a readable tar file ({err})") from None
    if not hasattr(tar, "end_reason"):  # opening read the first header: an empty shard's end marker stays None
        tar.end_reason = "unknown"  # type: ignore[attr-defined]
    pending = None  # without read_data, a member counts once the header after its data was read
    with tar:
        try:
            for member in tar:
                if pending is not None:
                    yield pending, None
                    pending = None
                if not member.isreg():
                    continue
                if not read_data:
                    pending = member.name
                    continue
                try:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                except tarfile.ReadError:  # tarfile's "unexpected end of data"
                    raise ShardTruncated(f"{url}: truncated inside member {member.name!r}") from None
                yield member.name, data
        except EOFError as err:  # a compressed stream cut short
            raise ShardTruncated(f"{url}: truncated ({err})") from None
        except tarfile.ReadError as err:  # skipping a cut member's data ends in "unexpected end of data"
            error = ShardTruncated if "end of data" in str(err) else ShardReadError
            raise error(f"{url}: {'truncated' if error is ShardTruncated else 'damaged'} ({err})") from None
        except tarfile.TarError as err:
            raise ShardReadError(f"{url}: damaged ({err})") from None
    reason = tar.end_reason  # type: ignore[attr-defined]
    if reason is not None:
        error = ShardTruncated if reason.startswith("truncated") else ShardReadError
        raise error(f"{url}: {reason}")
    if pending is not None:
        yield pending, None


def iter_samples(stream: IO[bytes], url: str) -> Iterator[dict]:
    """WebDataset samples: consecutive members sharing a key, as ``{"__key__", "__url__", ext: bytes}``.

    When the shard breaks off, the sample being read is still used if it has an image and a caption
    member (a later member of it may be lost: nothing tells), then the error propagates."""
    current: dict | None = None
    try:
        for name, data in iter_members(stream, url):
            key, ext = base_plus_ext(name)
            if key is None or Path(name).name.startswith("__"):
                continue
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = data
    except ShardReadError:
        if current is not None and any(k in current for k in WDS_IMAGE_KEYS) and ("txt" in current
                                                                                  or "json" in current):
            yield current
        raise
    if current is not None:
        yield current


def count_image_keys(path: Path) -> tuple[int, str | None]:
    """``(samples with an image member, problem or None)`` of a local shard, from its headers only.

    A damaged or cut shard is counted up to the damage and its problem returned, never raised: one bad
    shard must not stop a run before its first step."""
    keys = set()
    try:
        with open(path, "rb") as f:
            for name, _ in iter_members(f, str(path), read_data=False):
                key, ext = base_plus_ext(name)
                if key is not None and ext.lower() in WDS_IMAGE_KEYS:
                    keys.add(key)
    except (ShardReadError, OSError) as err:
        return len(keys), str(err)
    return len(keys), None
