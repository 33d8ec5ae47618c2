"""The frozen shard plan: which shards make the corpus, how many samples each holds, classes and channels.

Computed once per run (before any round) and stored in the work dir; the plan's digest is part of the config hash.
It reads every label of the corpus (``pipeline.labels``): class names get their ids here, in a sorted vocabulary
the plan records, and a corpus whose labels cannot be used is refused here, before any worker starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand
from PIL import Image

from pipeline.labels import LabelCensus, LabelSource, LabelsRefused
from pipeline.progress import eta
from pipeline.samples import find_image_member, ordered_map, screen, second_image_member
from pipeline.storage import fs, manifest
from pipeline.storage.markers import read_record
from pipeline.storage.shards import RawSample, ShardReadError, iter_samples, shard_id

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 5.0  # the plan's progress line while it reads the corpus
METADATA_THREADS = 16  # size and ETag requests in flight at once

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
    # The class vocabulary when labels are class names: the id of a name is its position. Empty: integer labels.
    label_names: tuple[str, ...] = ()

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def digest(self) -> str:
        text = "\n".join(f"{s.id}\t{s.url}\t{s.samples}" for s in self.shards)
        text += f"\n{self.num_classes}\t{self.channels}"
        if self.label_names:  # absent for integer labels, so their digests (and the runs they bind) are unchanged
            text += "\nlabels\t" + json.dumps(list(self.label_names))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_parquet(self) -> bytes:
        table = pa.table(
            {
                "shard": [s.id for s in self.shards],
                "url": [s.url for s in self.shards],
                "samples": [s.samples for s in self.shards],
            }
        )
        meta = {"num_classes": str(self.num_classes), "channels": str(self.channels)}
        if self.label_names:
            meta["label_names"] = json.dumps(list(self.label_names))
        table = table.replace_schema_metadata(meta)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    @classmethod
    def from_parquet(cls, data: bytes) -> Plan:
        table = manifest.from_parquet(data)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        rows = table.to_pylist()
        shards = tuple(ShardPlan(r["shard"], r["url"], r["samples"]) for r in rows)
        names = tuple(json.loads(meta["label_names"])) if "label_names" in meta else ()
        return cls(shards, int(meta["num_classes"]), int(meta["channels"]), names)


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
            raise PlanError(
                f"the input shard {url} has the id {sid!r}, which the release reserves for its own files "
                f"({', '.join(RESERVED_SHARD_IDS)}, names starting with '.'); rename the shard"
            )
        if sid in seen:
            raise PlanError(f"two inputs have the shard id {sid!r}: {seen[sid]} and {url}")
        seen[sid] = url
    return urls


def _image_channels(data: bytes) -> int | None:
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only: no pixels are decoded
            return 1 if img.mode in GRAY_MODES else 3
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for "not an image"
        return None  # undecodable: the worker rejects it with its reason


# Reads the shards whose part of the plan is not recorded yet: given (what, record_url) jobs, yields (job index,
# record) as each is done, in any order. ``read_here`` reads them one after another in this process; the Ray executor
# reads them as parallel tasks (``pipeline.executor.ray_pool.PlanReader``).
ShardReader = Callable[[list[tuple[dict, "str | None"]]], Iterator[tuple[int, dict]]]


def read_shard_record(what: dict, record_url: str | None) -> dict:
    """One shard's part of the plan (``what`` says which shard and how to read its labels), recorded at
    ``record_url`` as soon as it is known: the body of a plan task."""
    source = LabelSource.parse(what["label_key"])
    record = {"shard": what, **_read_shard(what["url"], what["image_key"], source, what["cluster"])}
    if record_url:
        fs.write_bytes(record_url, json.dumps(record).encode())
    return record


def read_here(jobs: list[tuple[dict, str | None]]) -> Iterator[tuple[int, dict]]:
    for i, (what, record_url) in enumerate(jobs):
        yield i, read_shard_record(what, record_url)


def _stamp(url: str) -> str:
    try:  # one metadata request a shard: the fingerprint answers "is it there" too
        return fs.fingerprint(url)
    except FileNotFoundError:
        raise PlanError(f"input shard not found: {url}") from None


def build_plan(
    inputs: list[str],
    num_classes: int | None,
    image_key: str | None,
    label_key: str,
    labels: str = "member",
    record_dir: str | None = None,
    reader: ShardReader = read_here,
) -> Plan:
    """Count every shard's samples and read every label: PlanError (one line that says what to pass) when the
    corpus cannot be protected as asked. ``labels="cluster"``: no label is read; ``num_classes`` groups are formed
    later (``pipeline.clusters``). ``record_dir`` (the work dir's): each shard's reading is recorded there as soon as
    it is done, and a rerun reuses the record of a shard whose size and ETag (or modification time) have not changed
    instead of reading it again (a coordinator killed while reading a large corpus loses no shard already read).
    ``reader`` reads the shards not recorded yet (``read_here``: one at a time, in this process)."""
    cluster = labels == "cluster"
    if cluster and num_classes is None:
        raise PlanError("--labels cluster needs --num-classes K: the number of groups to form")
    try:
        source = LabelSource.parse(label_key)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if num_classes is not None and num_classes < 2:
        raise PlanError(f"need at least 2 classes, got --num-classes {num_classes}")
    urls = expand_inputs(inputs)
    # The metadata (and the records of an earlier run) on threads: on an object store each is a round trip.
    whats = [
        {"url": url, "fingerprint": stamp, "image_key": image_key, "label_key": label_key, "cluster": cluster}
        for url, stamp in zip(urls, ordered_map(_stamp, urls, METADATA_THREADS))
    ]
    record_urls = [fs.join(record_dir, f"{shard_id(url)}.json") if record_dir else None for url in urls]
    records = list(ordered_map(lambda u: read_record(u) if u else None, record_urls, METADATA_THREADS))
    todo = []
    for i, (what, record) in enumerate(zip(whats, records)):
        if record is None or record.get("shard") != what:
            records[i] = None
            todo.append(i)
    if len(todo) < len(urls):
        log.info("plan: %d of %d shards from the records of an earlier run", len(urls) - len(todo), len(urls))
    t0 = last_log = time.monotonic()
    read = 0
    for done, (j, record) in enumerate(reader([(whats[i], record_urls[i]) for i in todo]), 1):
        records[todo[j]] = record
        read += record["samples"]
        now = time.monotonic()
        if now - last_log >= PROGRESS_EVERY_S or done in (1, len(todo)):  # a line while a large corpus is read
            last_log = now
            log.info(
                "plan: %d/%d shards read, %d samples (%.0f samples/s)%s",
                done,
                len(todo),
                read,
                read / max(now - t0, 1e-9),
                eta(done, len(todo), now - t0),
            )
    census = LabelCensus(source)
    for record in records:  # in the inputs' order, whichever order the shards were read in
        census.merge(record["census"])
    shards = [ShardPlan(shard_id(url), url, record["samples"]) for url, record in zip(urls, records)]
    channels = max([1, *(record["channels"] for record in records)])
    try:
        num_classes, label_names = (num_classes, ()) if cluster else census.classes(num_classes)
    except LabelsRefused as exc:
        raise PlanError(str(exc)) from None
    if num_classes < 2:
        what = f"one class name ({label_names[0][:40]!r})" if label_names else f"one class ({num_classes})"
        raise PlanError(f"need at least 2 classes, but the labels under --label-key {label_key} give {what}")
    kind = "clusters to form" if cluster else "class names" if label_names else "integer labels"
    log.info(
        "plan: %d shards, %d samples, %d classes (%s), %d channel(s)",
        len(shards),
        sum(s.samples for s in shards),
        num_classes,
        kind,
        channels,
    )
    return Plan(tuple(shards), num_classes, channels, label_names)


def _read_shard(url: str, image_key: str | None, source: LabelSource, cluster: bool) -> dict:
    """One shard's part of the plan: its sample count, its images' channels (0: none readable) and its labels."""
    census = LabelCensus(source)
    count = channels = 0
    seen: set[str] = set()
    for item in iter_samples(url):
        if isinstance(item, ShardReadError):
            log.warning("plan: %s: %s", shard_id(url), item.message)
            continue
        assert isinstance(item, RawSample)
        count += 1
        # Only labels of samples the workers could protect count (the same screening as pipeline.samples), so
        # a stray label on an unsafe, image-less or unreadable sample neither adds a class nor changes the rule.
        if screen(item, seen) is not None:
            continue
        member = find_image_member(item.members, image_key)
        if member is None or second_image_member(item.members, member) is not None:
            continue
        sample_channels = _image_channels(item.members[member])
        if sample_channels is None:
            continue
        channels = max(channels, sample_channels)
        if not cluster:
            census.add(item.members)
    return {"samples": count, "channels": channels, "census": census.to_record()}


def local_path(url: str) -> str:
    return os.path.abspath(url) if "://" not in url else url
