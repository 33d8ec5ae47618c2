"""URLs through fsspec: local paths, ``s3://`` (s3fs, credentials from the standard AWS chain), any fsspec URL."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of a URL (plain paths are local).

    ``s3://`` goes through s3fs, whose endpoint and credentials come from the standard AWS chain
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles); none of them
    is passed, logged or stored here. Listings are not cached: markers are written by other processes (the workers),
    and a cached listing would hide a marker written after it.
    """
    if url.startswith(("s3://", "s3a://")):
        return url_to_fs(url, use_listings_cache=False)
    return url_to_fs(url)


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def strip_url(url: str) -> str:
    """A URL without a trailing slash (``s3://bkt/out/`` and ``s3://bkt/out`` are the same output)."""
    return url.rstrip("/") if len(url.rstrip("/")) > 0 else url


def check_no_credentials(url: str, flag: str) -> None:
    """Refuse a URL that carries credentials (``s3://KEY:SECRET@bucket``) without repeating them anywhere."""
    if "://" in url:
        netloc = url.split("://", 1)[1].split("/", 1)[0]
        if "@" in netloc:
            raise ValueError(
                f"{flag} holds credentials in its URL; remove them and use the standard AWS chain "
                "(environment, profile or role)"
            )


def location(url: str) -> tuple[str, str]:
    """Where ``url`` really is, for comparing places: ("file", real path) or (scheme, "bucket/normalised/prefix")."""
    url = strip_url(url)
    if "://" not in url or url.startswith("file://"):
        return "file", os.path.realpath(url.removeprefix("file://"))
    scheme, rest = url.split("://", 1)
    return scheme, posixpath.normpath("/" + rest).lstrip("/")


def within(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """True when location ``a`` is ``b`` or lies inside it (locations as ``location`` gives them)."""
    return a[0] == b[0] and (a[1].rstrip("/") + "/").startswith(b[1].rstrip("/") + "/")


def overlaps(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """True when two locations are equal or one contains the other."""
    return within(a, b) or within(b, a)


# Errors that no retry or rerun can mend: the user has to change something (exit 2, not "rerun to resume").
PERMANENT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENAMETOOLONG, errno.EEXIST}
)


def is_permanent(exc: BaseException) -> bool:
    """True for storage errors that a rerun cannot mend: access denied, no such bucket or file, not a directory,
    a read-only file system. s3fs raises PermissionError for AccessDenied and FileNotFoundError for NoSuchBucket."""
    if isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)):
        return True
    return isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS


def retry(fn: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 0.5) -> T:
    """Call ``fn`` and retry transient I/O errors (OSError, which s3fs and local I/O raise) with backoff; permanent
    ones (``is_permanent``) are raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as exc:
            if is_permanent(exc) or attempt == attempts:
                raise
            delay = base_delay * 2 ** (attempt - 1)
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc, attempt, attempts, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retry(lambda: fs.exists(path), f"exists {url}")


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return retry(lambda: fs.cat_file(path), f"read {url}")


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(retry(lambda: fs.size(path), f"size {url}"))


def fingerprint(url: str) -> str:
    """What changes when the object's bytes change, short of reading them: its size and its ETag (an object store)
    or modification time (a file system)."""
    fs, path = filesystem(url)
    info = retry(lambda: fs.info(path), f"info {url}")
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{stamp}"


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see the old object or the whole new one, never a part.

    On a file system: a temp file in the same folder, fsync, then ``os.replace`` (atomic within a file system).
    On S3 and other object stores there is no rename: the single PUT is the atomic step.
    """
    fs, path = filesystem(url)
    if is_local(url):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path)[-40:])
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # Release files are read by anyone the owner publishes them to (mkstemp makes 0600).
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    retry(lambda: fs.pipe_file(path, data), f"write {url}")


def write_verified(url: str, data: bytes) -> str:
    """Write, then check the stored size; return the sha256 of what was written (it goes into the marker)."""
    write_bytes(url, data)
    stored = size(url)
    if stored != len(data):
        raise OSError(f"verification failed for {url}: wrote {len(data)} bytes, store reports {stored}")
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def writing(url: str) -> Iterator[BinaryIO]:
    """Write ``url`` through a local temp file, for data too large to hold in memory: committed whole when the block
    ends (``os.replace`` beside it on a file system; one upload to an object store, a multipart upload completing at
    its end), then its stored size checked, as ``write_verified``. On an error nothing is committed or left behind."""
    local = is_local(url)
    fsys, path = filesystem(url)
    folder = None
    if local:
        folder = os.path.dirname(os.path.abspath(path))  # the rename stays within one file system
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path)[-40:])
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        written = os.path.getsize(tmp)
        if local:
            os.chmod(tmp, 0o644)  # release files are read by anyone the owner publishes them to (mkstemp: 0600)
            os.replace(tmp, path)
        else:
            retry(lambda: fsys.put_file(tmp, path), f"write {url}")
        stored = size(url)
        if stored != written:
            raise OSError(f"verification failed for {url}: wrote {written} bytes, store reports {stored}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        retry(lambda: fs.rm(path, recursive=recursive), f"remove {url}")


def is_file(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(retry(lambda: fs.isfile(path), f"isfile {url}"))


def remove_empty_dir(url: str) -> None:
    """Remove a local folder if it is empty (object stores have no folders: nothing to do there)."""
    if is_local(url):
        _, path = filesystem(url)
        try:
            os.rmdir(path)
        except OSError:
            pass  # not empty, or already gone


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under a folder or prefix; empty when it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def find(url: str, suffix: str) -> list[str]:
    """Every object under a folder or prefix whose name ends with ``suffix``, as URLs with the input's scheme."""
    fs, path = filesystem(url)
    found = sorted(p for p in fs.find(path) if p.endswith(suffix))
    scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
    return [scheme + p if scheme and not p.startswith(scheme) else p for p in found]


def open_read(url: str):
    """A streaming binary file object (the caller closes it)."""
    fs, path = filesystem(url)
    return fs.open(path, "rb")
