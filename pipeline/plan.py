"""The frozen shard plan: which shards make the corpus, how many samples each holds, classes and channels.

Computed once per run (before any round) and stored in the work dir; the plan's digest is part of the config hash.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand
from PIL import Image

from pipeline.samples import find_image_member, parse_label
from pipeline.storage import fs
from pipeline.storage.shards import RawSample, ShardReadError, iter_samples, shard_id

log = logging.getLogger(__name__)

GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


# Shard ids whose release files would collide with the release's own (manifest.parquet beside <shard>.parquet).
RESERVED_SHARD_IDS = ("manifest", "_SUCCESS")


class PlanError(ValueError):
    """The inputs cannot form a corpus (no shards, two shards with one id, ...)."""


@dataclass(frozen=True)
class ShardPlan:
    id: str
    url: str
    samples: int


@dataclass(frozen=True)
class Plan:
    shards: tuple[ShardPlan, ...]
    num_classes: int
    channels: int  # 1 when every image is grayscale, else 3

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def digest(self) -> str:
        text = "\n".join(f"{s.id}\t{s.url}\t{s.samples}" for s in self.shards) + f"\n{self.num_classes}\t{self.channels}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_parquet(self) -> bytes:
        table = pa.table(
            {
                "shard": [s.id for s in self.shards],
                "url": [s.url for s in self.shards],
                "samples": [s.samples for s in self.shards],
            }
        )
        table = table.replace_schema_metadata({"num_classes": str(self.num_classes), "channels": str(self.channels)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    @classmethod
    def from_parquet(cls, data: bytes) -> Plan:
        table = pq.read_table(io.BytesIO(data))
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        rows = table.to_pylist()
        shards = tuple(ShardPlan(r["shard"], r["url"], r["samples"]) for r in rows)
        return cls(shards, int(meta["num_classes"]), int(meta["channels"]))


def expand_inputs(inputs: list[str]) -> list[str]:
    """Shard URLs from brace patterns, single tars, or folders/prefixes (every ``*.tar`` under them)."""
    urls: list[str] = []
    for spec in inputs:
        for item in braceexpand(spec):
            if item.endswith(".tar"):
                urls.append(item)
            else:
                found = fs.find(item, ".tar")
                if not found:
                    raise PlanError(f"no *.tar shards under {item}")
                urls.extend(found)
    if not urls:
        raise PlanError("no input shards")
    seen: dict[str, str] = {}
    for url in urls:
        sid = shard_id(url)
        if sid in RESERVED_SHARD_IDS or sid.startswith("."):
            raise PlanError(f"the input shard {url} has the id {sid!r}, which the release reserves for its own files "
                            f"({', '.join(RESERVED_SHARD_IDS)}, names starting with '.'); rename the shard")
        if sid in seen:
            raise PlanError(f"two inputs have the shard id {sid!r}: {seen[sid]} and {url}")
        seen[sid] = url
    return urls


def _image_channels(data: bytes) -> int | None:
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only: no pixels are decoded
            return 1 if img.mode in GRAY_MODES else 3
    except Exception:
        return None  # undecodable: the worker rejects it with its reason


def build_plan(inputs: list[str], num_classes: int | None, image_key: str | None, label_key: str) -> Plan:
    urls = expand_inputs(inputs)
    shards = []
    max_label = -1
    channels = 1
    for url in urls:
        if not fs.exists(url):
            raise PlanError(f"input shard not found: {url}")
        count = 0
        for item in iter_samples(url):
            if isinstance(item, ShardReadError):
                log.warning("plan: %s: %s", shard_id(url), item.message)
                continue
            assert isinstance(item, RawSample)
            count += 1
            try:
                max_label = max(max_label, parse_label(item.members, label_key, None))
            except ValueError:
                pass
            member = find_image_member(item.members, image_key)
            if member is not None and channels == 1 and _image_channels(item.members[member]) == 3:
                channels = 3
        shards.append(ShardPlan(shard_id(url), url, count))
    if num_classes is None:
        if max_label < 0:
            raise PlanError(f"no sample has an integer '.{label_key}' label: pass --num-classes or --label-key")
        num_classes = max_label + 1
    if num_classes < 2:
        raise PlanError(f"need at least 2 classes, found {num_classes}")
    log.info("plan: %d shards, %d samples, %d classes, %d channel(s)", len(shards), sum(s.samples for s in shards),
             num_classes, channels)
    return Plan(tuple(shards), num_classes, channels)


def local_path(url: str) -> str:
    return os.path.abspath(url) if "://" not in url else url
