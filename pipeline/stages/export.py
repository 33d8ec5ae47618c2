"""The export: each worker writes its shards' release (tar and manifest, verified, then the shard's marker: its unit of
done); the merged manifest last."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from dataclasses import replace

from ops import metrics
from ops.image import (
    ENCODE_FORMATS,
    decoded_release,
    encode_image,
    release_native,
)
from pipeline import faults
from pipeline.inspection import verify_shards
from pipeline.plan import Plan
from pipeline.progress import eta
from pipeline.samples import Rejected, ordered_map, released_members, reread
from pipeline.storage import fs, manifest
from pipeline.storage.layout import Layout
from pipeline.storage.markers import commit_files, drop, is_done, read_marker
from pipeline.storage.shards import RawSample, ShardReadError, iter_samples, write_tar

log = logging.getLogger(__name__)


class ExportWork:
    """The worker's side: one shard's release, written and committed."""

    def export_shard(self, shard: str, output: str, work: str, config_hash: str) -> dict:
        """Write ``<shard>.tar`` and ``<shard>.parquet``, verify them, then the ``<shard>_stats.json`` marker."""
        faults.at_unit("worker", "export", None, shard)
        t0 = time.perf_counter()
        layout = Layout(output, work)
        sd = self.shards[shard]
        noise = self.noise_rows(slice(sd.start, sd.end)).cpu()
        labels = self.y[sd.start : sd.end].tolist()  # the labels trained on (with --labels cluster, the clusters)
        read_error = None
        # The export decodes the photos' metadata too: the ICC profile always goes with the pixels; EXIF and XMP
        # (GPS position, camera, time) only with --keep-metadata.
        rules = replace(self.rules, metadata=True)
        keep = self.cfg.keep_metadata
        fmt = self.cfg.encode_format
        ext = ENCODE_FORMATS[fmt]

        def released() -> Iterator[tuple]:
            """In shard order: a finished manifest row (rejections), or a released image still to encode."""
            nonlocal read_error
            for item, result, index in reread(shard, iter_samples(sd.url), sd.keys, rules, self.threads):
                if isinstance(result, ShardReadError):
                    read_error = result.message
                    continue
                if isinstance(result, Rejected):
                    yield (
                        manifest.row(
                            result.key,
                            shard,
                            "rejected",
                            error=result.error,
                            label=result.label,
                            source_sha256=result.source_sha256,
                        ),
                        None,
                    )
                    continue
                image = release_native(result.image.color, noise[index])
                row = {
                    "label": labels[index],
                    "width": result.image.width,
                    "height": result.image.height,
                    "source_sha256": result.source_sha256,
                    "output_member": f"{result.key}.{ext}",
                }
                yield row, (item, result, image)

        def encode(job: tuple) -> tuple[dict, RawSample | None]:
            row, accepted = job
            if accepted is None:
                return row, None
            item, result, image = accepted
            decoded = result.image
            # zlib (or the JPEG / WebP encoder): the slow part of the export, on the threads
            data = encode_image(
                image,
                decoded.alpha,
                fmt=fmt,
                quality=self.cfg.encode_quality,
                icc=decoded.icc,
                exif=decoded.exif if keep else None,
                xmp=decoded.xmp if keep else None,
            )
            # The image quality of what a victim decodes: for a lossy release, the codec's error is in it.
            released = image if fmt == "png" else decoded_release(data, image.shape[0])
            original = decoded.color
            row.update(
                linf=metrics.linf(released, original),
                l2=metrics.l2(released, original),
                psnr=metrics.psnr(released, original),
            )
            sample = RawSample(result.key, released_members(item, data, result.image_member, ext))
            return manifest.row(result.key, shard, "protected", output_sha256=_sha256(data), **row), sample

        rows: list[dict] = []
        out_samples: list[RawSample] = []
        for row, sample in ordered_map(encode, released(), self.threads):
            rows.append(row)
            if sample is not None:
                out_samples.append(sample)
        tar_bytes = write_tar(out_samples)
        manifest_bytes = manifest.to_parquet(rows, source_hash=self.cfg.manifest_source_hash)
        protected = sum(1 for r in rows if r["status"] == "protected")
        linf_max = max((r["linf"] for r in rows if r["status"] == "protected"), default=0)
        stats = {
            "shard": shard,
            "input": len(rows),
            "protected": protected,
            "rejected": len(rows) - protected,
            "linf_max": linf_max,
            # The unreadable rest of a shard has no keys to give rows to; the marker records the shard's fault.
            "read_error": read_error,
            "tar_bytes": len(tar_bytes),
            "manifest_bytes": len(manifest_bytes),
        }
        files = {
            "tar": (layout.shard_tar(shard), tar_bytes),
            "manifest": (layout.shard_manifest(shard), manifest_bytes),
        }
        stats.update(
            commit_files(
                files, layout.shard_marker(shard), config_hash, seconds=round(time.perf_counter() - t0, 3), **stats
            )
        )
        return stats


class ExportStage:
    """The coordinator's side: every shard not yet released, the workers in parallel."""

    def export(self) -> None:
        """Every worker writes the release of the shards it owns, one at a time, the workers in parallel; the merged
        manifest last. (One export in flight per worker: an attempt is logged when its work starts, not queued.)"""
        t0 = time.perf_counter()
        layout = self.layout
        todo = {i: collections.deque() for i in range(len(self.workers))}
        # Shards released by an earlier coordinator are checked against their markers first: one changed or lost
        # since then is released again (the state to do so is here).
        earlier = [s.id for s in self.plan.shards if is_done(layout.shard_marker(s.id), self.chash)]
        damaged = verify_shards(layout.output, earlier, self.chash, self.cfg.to_dict())
        if damaged:
            log.warning("released shard(s) changed since they were written, released again: %s", ", ".join(damaged))
            drop(*[layout.shard_marker(s) for s in damaged])
        for shard in self.plan.shards:
            if not is_done(layout.shard_marker(shard.id), self.chash):
                todo[self.owner[shard.id]].append(shard.id)
        total, done = sum(len(q) for q in todo.values()), 0
        running: dict = {}
        while any(todo.values()) or running:
            busy = {w for w, _ in running.values()}
            for i, queue in todo.items():
                if queue and i not in busy:
                    shard = queue.popleft()
                    self._attempt("export", None, shard)
                    ref = self.workers[i].export_shard.remote(shard, layout.output, layout.work, self.chash)
                    running[ref] = (i, shard)
            ready, _ = self.pool.wait(list(running))
            for ref in ready:
                _, shard = running.pop(ref)
                stats = self.pool.get(ref)
                done += 1
                log.info(
                    "export: %d/%d shards written (%s: %d protected, %d rejected)%s",
                    done,
                    total,
                    shard,
                    stats["protected"],
                    stats["rejected"],
                    eta(done, total, time.perf_counter() - t0),
                )
        self.counts = merge_manifests(layout, self.plan, self.cfg.manifest_source_hash)
        self.timings["export"] += time.perf_counter() - t0


def merge_manifests(layout: Layout, plan: Plan, source_hash: bool) -> dict:
    """``manifest.parquet`` from the shards' manifests, streamed a shard at a time; returns the counts the shards'
    markers hold."""
    counts = {"input": 0, "protected": 0, "rejected": 0}
    for shard in plan.shards:
        stats = read_marker(layout.shard_marker(shard.id))
        for k in counts:
            counts[k] += stats[k]
    with fs.writing(layout.manifest) as out:
        manifest.merge((fs.read_bytes(layout.shard_manifest(s.id)) for s in plan.shards), out, source_hash)
    return counts


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
