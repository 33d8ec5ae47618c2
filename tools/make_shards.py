"""``make-shards``: a folder of files (local or an object-storage prefix) into WebDataset shards, streamed.

The source is walked recursively in sorted order of each file's relative path (compared folder by folder), so the
same tree always gives the same shards; names starting with ``.`` (files and folders) are skipped. Labels:

- ``folders`` (the default): a file's label is its top-level sub-folder under the source. Classes are numbered by
  the sorted sub-folder names; ``classes.json`` beside the shards records the mapping. Files directly in the source
  are refused (they have no class).
- ``none``: no ``cls`` member at all.

A sample's key is its relative path without the extension, separators and dots made ``_`` (``cat/a.b.png`` ->
``cat_a_b``); two files that map to one key stay separate samples. Files keep their bytes and extension (a ``.jpg``
stays ``<key>.jpg``); files that are not images go in as they are and are rejected, with their reason, when protected.

Memory stays bounded by one file, not by the corpus or a shard: each file is read once and appended at once to the
tar being written in a temp file, and each finished tar is committed whole (``<prefix>-000000.tar``, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
from collections.abc import Iterator

from webdataset import TarWriter

from pipeline.storage import fs
from pipeline.storage.shards import TAR_MTIME

log = logging.getLogger(__name__)

EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpeg", ".webp": "webp"}
LABEL_MODES = ("folders", "none")
PROGRESS_EVERY = 10  # shards between two progress lines


def make_shards(src: str, out: str, per_shard: int = 1000, prefix: str = "shard", labels: str = "folders") -> dict:
    """Write the files under ``src`` as shards of ``per_shard`` samples under ``out``; return what was written."""
    if per_shard < 1:
        raise ValueError("--per-shard must be at least 1")
    if labels not in LABEL_MODES:
        raise ValueError(f"--labels must be one of {', '.join(LABEL_MODES)}, not {labels!r}")
    fs.check_no_credentials(src, "SRC")
    fs.check_no_credentials(out, "OUT")
    if fs.within(fs.location(out), fs.location(src)):
        raise ValueError(f"OUT {out} is inside SRC {src}: a rerun would read the shards back as source files")
    source = _Source(src)
    classes: list[str] = []
    if labels == "folders":
        folders, root_files = source.top_level()
        if root_files:
            raise ValueError(
                f"{src} holds files directly in it ({root_files[0]}, ...) but --labels folders takes the "
                "label from the sub-folder: move them into class sub-folders or pass --labels none"
            )
        classes = folders
    class_id = {name: str(i).encode() for i, name in enumerate(classes)}

    writer = _ShardWriter(out, prefix, per_shard)
    keys: set[str] = set()
    try:
        for rel in source.files():
            stem, ext = posixpath.splitext(rel)
            member = EXTENSIONS.get(ext.lower(), ext.lower().lstrip(".") or "bin")
            key = stem.replace("/", "_").replace(".", "_")
            # Two files may map to one key (x.png and x.jpg, a.b.png and a_b.png): keep them separate samples.
            base, n = key, 1
            while key in keys:
                n += 1
                key = f"{base}_{n}"
            keys.add(key)
            members = {member: source.read(rel)}
            if labels == "folders":
                members["cls"] = class_id[rel.split("/", 1)[0]]
            writer.add(key, members)
        if writer.samples == 0:
            raise ValueError(f"{src} holds no files to shard (names starting with '.' are skipped)")
        shards = writer.finish()
    finally:
        writer.abort()  # a temp file left by an error; nothing after finish()
    if labels == "folders":
        fs.write_bytes(fs.join(out, "classes.json"), json.dumps(dict(enumerate(classes)), indent=2).encode())
    log.info("make-shards: %d samples in %d shards under %s", writer.samples, len(shards), out)
    return {
        "shards": shards,
        "samples": writer.samples,
        "classes": len(classes) if labels == "folders" else None,
        "labels": labels,
    }


def _hidden(name: str) -> bool:
    return name.startswith(".")


class _Source:
    """The files under a folder or prefix: listed in sorted order of their relative paths, read one at a time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fsys, self.root = fs.filesystem(url)
        self.root = self.root.rstrip("/") or self.root
        self.local = fs.is_local(url)
        self._remote: list[str] | None = None
        if not fs.retry(lambda: self.fsys.isdir(self.root), f"isdir {url}"):
            if fs.retry(lambda: self.fsys.exists(self.root), f"exists {url}"):
                raise ValueError(f"SRC {url} is a file, not a folder")
            raise ValueError(f"SRC {url} does not exist")

    def top_level(self) -> tuple[list[str], list[str]]:
        """The sorted names of the (non-hidden) sub-folders and of the files directly in the source."""
        if self.local:
            with os.scandir(self.root) as it:
                entries = [e for e in it if not _hidden(e.name)]
            return (
                sorted(e.name for e in entries if e.is_dir()),
                sorted(e.name for e in entries if not e.is_dir() and e.is_file()),
            )
        # Object stores have no folders, only prefixes of objects: a folder is a first component with more after it.
        rels = self._remote_files()
        return sorted({r.split("/", 1)[0] for r in rels if "/" in r}), [r for r in rels if "/" not in r]

    def files(self) -> Iterator[str]:
        """Relative paths (``/``-separated) of every non-hidden file, sorted folder by folder."""
        if self.local:
            yield from self._walk_local(self.root, "", frozenset({os.path.realpath(self.root)}))
        else:
            yield from self._remote_files()

    def read(self, rel: str) -> bytes:
        if self.local:
            with open(os.path.join(self.root, *rel.split("/")), "rb") as f:
                return f.read()
        path = f"{self.root}/{rel}"
        return fs.retry(lambda: self.fsys.cat_file(path), f"read {self.url}/{rel}")

    def _walk_local(self, folder: str, rel: str, seen: frozenset[str]) -> Iterator[str]:
        # Lazily, one folder's listing at a time; entries sorted by name give the same order as sorting the whole
        # list of relative paths component by component (a folder "a" before a file "a.png").
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir():  # follows a link to a folder, as a listing by hand would
                real = os.path.realpath(entry.path)
                if real in seen:
                    log.warning("make-shards: skipping %s, a link back to a folder above it", name)
                    continue
                yield from self._walk_local(entry.path, name, seen | {real})
            elif entry.is_file():
                yield name

    def _remote_files(self) -> list[str]:
        # One recursive listing (no per-folder requests); names only, the contents are read one file at a time.
        if self._remote is None:
            found = fs.retry(lambda: self.fsys.find(self.root, withdirs=False), f"list {self.url}")
            rels = []
            for path in found:
                rel = path[len(self.root) :].strip("/") if path.startswith(self.root + "/") else ""
                parts = rel.split("/")
                if rel and not path.endswith("/") and not any(not p or _hidden(p) for p in parts):
                    rels.append(rel)
            self._remote = sorted(rels, key=lambda r: r.split("/"))
        return self._remote


class _ShardWriter:
    """Shards written one after another: each sample goes straight into a tar in a temp file (``fs.writing``), and a
    full tar is committed whole, so a reader never sees part of a shard and memory never holds one."""

    def __init__(self, out: str, prefix: str, per_shard: int) -> None:
        self.out, self.prefix, self.per_shard = out, prefix, per_shard
        self.shards: list[str] = []
        self.samples = 0
        self._in_shard = 0
        self._stack: contextlib.ExitStack | None = None
        self._tar: TarWriter | None = None

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, **members})
        self._in_shard += 1
        self.samples += 1
        if self._in_shard == self.per_shard:
            self._commit()

    def finish(self) -> list[str]:
        if self._tar is not None:
            self._commit()
        return self.shards

    def abort(self) -> None:
        """The shard being written is not committed, and its temp file goes."""
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("make-shards aborted"), None)
        self._stack = self._tar = None

    def _url(self) -> str:
        return fs.join(self.out, f"{self.prefix}-{len(self.shards):06d}.tar")

    def _open(self) -> None:
        self._stack = contextlib.ExitStack()
        file = self._stack.enter_context(fs.writing(self._url()))
        # The same TarWriter settings as shards.write_tar: the same samples give the same bytes.
        self._tar = TarWriter(file, encoder=False, mtime=TAR_MTIME, user="unlearnable", group="unlearnable")
        self._in_shard = 0

    def _commit(self) -> None:
        url = self._url()
        self._tar.close()
        self._stack.close()  # the temp file renamed into place or uploaded, its size checked
        self._stack = self._tar = None
        self.shards.append(url)
        log.debug("make-shards: wrote %s (%d samples)", url, self._in_shard)
        if len(self.shards) % PROGRESS_EVERY == 0:
            log.info("make-shards: %d shards, %d samples written", len(self.shards), self.samples)
