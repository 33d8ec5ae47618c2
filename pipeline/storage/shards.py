"""WebDataset shards: stream a tar into samples (members grouped by ``__key__``), write one deterministically.

A sample's key is a member's path up to the first dot of its file name; the rest is the member's extension
(``a/b/0001.seg.png`` -> key ``a/b/0001``, extension ``seg.png``), as webdataset groups them.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from webdataset import TarWriter

from pipeline.storage import fs

# Fixed tar metadata so that the same samples always give the same bytes (resume must be byte-identical).
TAR_MTIME = 0.0


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ShardReadError:
    """The shard could not be read to its end (truncated, not a tar, unreadable); samples before it still count."""

    message: str


def shard_id(url: str) -> str:
    """A shard's id is its file stem, never its position in the corpus."""
    name = os.path.basename(url.rstrip("/"))
    return name[: -len(".tar")] if name.endswith(".tar") else os.path.splitext(name)[0]


def split_member_name(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext


def iter_samples(url: str) -> Iterator[RawSample | ShardReadError]:
    """Stream a shard and yield its samples in order; a read failure is yielded last as ``ShardReadError``.

    Members are grouped by consecutive key, as webdataset does; a key that reappears later in the shard yields a
    second sample with the same key (the caller rejects the repeat).
    """
    current: RawSample | None = None
    try:
        with fs.open_read(url) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key)
                # A member repeated within one sample: keep the first, as the tar's order says.
                current.members.setdefault(ext, data)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if current is not None:
            yield current
        yield ShardReadError(f"shard unreadable after {'sample ' + current.key if current else 'its start'}: "
                             f"{type(exc).__name__}: {exc}")
        return
    if current is not None:
        yield current


def write_tar(samples: list[RawSample]) -> bytes:
    """A tar of the given samples, members sorted within each sample, with fixed metadata: reproducible bytes."""
    buf = io.BytesIO()
    writer = TarWriter(buf, encoder=False, mtime=TAR_MTIME, user="unlearnable", group="unlearnable")
    for sample in samples:
        writer.write({"__key__": sample.key, **sample.members})
    writer.close()
    return buf.getvalue()
