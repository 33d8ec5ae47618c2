"""Stage 0, load: each worker streams its share of the shards, decodes them once and keeps what the stages need
(``LoadWork``); the coordinator starts the pool, shares the shards out, logs the load's progress and, with
``--labels cluster``, clusters the pool (``LoadStage``).

Where the decoded data lives: the working images and the noise on the worker's device, or in files on its local disk
(``pipeline.rows``: ``--cache disk`` and ``none``, ``auto`` over budget); the native images only where the stop check
needs them (in memory, on local disk (``pipeline.native_cache``), or decoded from the input again).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ops.engine import to_device
from ops.image import LOSSY_FORMATS, DecodedImage, to_working
from pipeline import clusters
from pipeline.native_cache import DiskShard
from pipeline.prepare import ConfigRefused
from pipeline.progress import eta
from pipeline.rows import RowFile
from pipeline.samples import Rejected, prepare_each, reread
from pipeline.schedule import assign_shards
from pipeline.storage.markers import DamagedUnit, commit, load_checked
from pipeline.storage.shards import ShardReadError, iter_samples, read_ahead

log = logging.getLogger(__name__)
# --cache auto without --cache-memory-gb: a worker keeps native images up to this share of its node's memory.
CACHE_SHARE_OF_MEMORY = 0.2


@dataclass
class ShardData:
    id: str
    url: str
    start: int  # this shard's rows in the worker's tensors: [start, end)
    end: int
    keys: list[str]
    # The decoded images at native size, kept for the stop check (``--cache``): in memory, or on local disk; None: not
    # kept, the stop check streams the shard again (a shard whose images are the working images needs none, unless
    # the release is lossy).
    natives: list[DecodedImage] | DiskShard | None
    native_is_working: bool  # every image already has the working size and channels: no resize needed
    rejected: int = 0
    read_error: str | None = None
    timings: dict = field(default_factory=dict)


class LoadWork:
    """The worker's side (a part of ``RoundWorker``): its shards loaded, the rows it holds, ``--labels cluster``'s
    share of the k-means."""

    def load_shards(self, shards: list[tuple[str, str]]) -> list[dict]:
        """Stream this worker's shards (id, url), decode them and keep the accepted samples on the device.

        The next shard is fetched while the current one is decoded (``read_ahead``); nothing is copied to local disk.
        """
        return list(self.load_shards_streamed(shards))

    def load_shards_streamed(self, shards: list[tuple[str, str]]) -> Iterator[dict]:
        """``load_shards``, yielding each shard's result as soon as it is loaded (on Ray, a streaming generator: the
        coordinator logs the load's progress shard by shard)."""
        if self.n_owned != self.x.shape[0]:
            raise RuntimeError("owned shards are loaded before any guest shard")
        # In memory, the shards' rows join the worker's tensors once, after the last shard: growing them shard by
        # shard would copy them again for every shard and hold two copies at each step. On disk, each shard's rows
        # are written as it is decoded (its labels join at the end).
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        start = self.x.shape[0]
        for (shard, url), items in zip(shards, read_ahead([u for _, u in shards])):
            result, x, y = self._decode(shard, url, items, start)
            start += len(y)
            if self.rows_on_disk is None:
                self._choose_rows_place(len(y), len(shards))
            if isinstance(self.x, RowFile):
                self._write_rows(x)
                x = None
            rows.append((x, y))
            self.owned.append(shard)
            yield result
        self._append_rows(rows)
        self.n_owned = self.x.shape[0]

    def load_shard(self, shard: str, url: str) -> dict:
        """One shard (see ``load_shards``)."""
        return self.load_shards([(shard, url)])[0]

    def _append_rows(self, rows: list[tuple[torch.Tensor | None, torch.Tensor]]) -> None:
        """Decoded shards' working images and labels after the rows held, with zero noise: uploaded once, through
        pinned host memory on a GPU (ops.engine.to_device). An image tensor of None: those rows are already in the
        rows file (their labels are added here)."""
        if not rows:
            return
        y = to_device(torch.cat([r[1] for r in rows]), self.device)
        self.y = torch.cat([self.y, y]) if self.y.shape[0] else y
        images = [r[0] for r in rows if r[0] is not None]
        if not images:
            return
        if isinstance(self.x, RowFile):
            for x in images:
                self._write_rows(x)
            return
        x = to_device(torch.cat(images), self.device)
        held = self.x.shape[0] > 0
        self.x = torch.cat([self.x, x]) if held else x
        zeros = torch.zeros(x.shape, dtype=torch.int8, device=self.device)
        self.noise_q = torch.cat([self.noise_q, zeros]) if held else zeros

    def _write_rows(self, x: torch.Tensor) -> None:
        """Working images after the rows held in the rows files, with zero noise."""
        self.x.append(x)
        self.noise_q.append(torch.zeros(x.shape, dtype=torch.int8))

    def _choose_rows_place(self, first_shard_rows: int, shards: int) -> None:
        """--cache auto, at the first shard loaded: the working rows stay on the device while the share (estimated as
        ``shards`` of the first one's size) fits the cache budget, else they go to a rows file on local disk."""
        row_bytes = 2 * self.channels * self.cfg.resolution**2  # a uint8 image and its int8 noise levels
        estimate = first_shard_rows * shards * row_bytes
        self.rows_on_disk = estimate > self.cache_budget
        if self.rows_on_disk:
            log.info(
                "worker %d: about %.1f GB of working images and noise, over the --cache budget of %.1f GB: kept in a "
                "file on local disk",
                self.index,
                estimate / 1e9,
                self.cache_budget / 1e9,
            )
            self._rows_to_disk()

    def _rows_to_disk(self) -> None:
        """From here on the working images and noise levels live in rows files (``pipeline.rows``)."""
        if self.x.shape[0]:
            raise RuntimeError("the rows move to disk before any is held")
        shape = tuple(self.x.shape[1:])
        self.x = RowFile(shape, torch.uint8, self.device)
        self.noise_q = RowFile(shape, torch.int8, self.device)

    def _decode(self, shard: str, url: str, items, start: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Decode one shard whose rows will start at ``start``; registers it and returns its result, working images
        and labels (``_append_rows`` adds them)."""
        t0 = time.perf_counter()
        keys, natives, working, labels = [], [], [], []
        rejected, read_error = 0, None
        for _, result in prepare_each(items, self.rules, self.threads):
            if isinstance(result, ShardReadError):
                read_error = result.message
                continue
            if isinstance(result, Rejected):
                rejected += 1
                continue
            keys.append(result.key)
            natives.append(result.image)
            working.append(to_working(result.image.color, self.cfg.resolution, self.channels))
            labels.append(result.label)
        r = self.cfg.resolution
        x = torch.stack(working) if working else torch.empty(0, self.channels, r, r, dtype=torch.uint8)
        if self.centroids is not None:  # --labels cluster, a shard loaded after the clustering (a guest)
            labels = clusters.nearest(clusters.features(x), self.centroids).tolist()
        same = all(tuple(n.color.shape) == (self.channels, r, r) for n in natives)
        kept = self._cache_natives(natives, same)
        self.shards[shard] = ShardData(shard, url, start, start + len(keys), keys, kept, same, rejected, read_error)
        result = {
            "shard": shard,
            "accepted": len(keys),
            "rejected": rejected,
            "read_error": read_error,
            "seconds": time.perf_counter() - t0,
        }
        return result, x, torch.tensor(labels, dtype=torch.long)

    # ---- --labels cluster (pipeline.clusters) --------------------------------------------------------------------
    def _feature_chunks(self, chunk: int = 16384) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, features) of every held row, a chunk at a time (a million rows never in memory at once)."""
        for start in range(0, self.x.shape[0], chunk):
            yield start, clusters.features(self.x[start : start + chunk].cpu())

    def cluster_candidates(self, m: int) -> list[tuple[str, torch.Tensor]]:
        """This worker's ``m`` owned samples of smallest key hash (the k-means++ candidates): (hash, features)."""
        ranked = sorted(
            (clusters.key_rank(k, self.cfg.seed), sd.start + i)
            for s in self.owned
            for sd in (self.shards[s],)
            for i, k in enumerate(sd.keys)
        )[:m]
        if not ranked:
            return []
        feats = clusters.features(self.x[torch.tensor([row for _, row in ranked], device=self.x.device)].cpu())
        return [(rank, f) for (rank, _), f in zip(ranked, feats)]

    def cluster_sums(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Lloyd step's share: per-centroid float64 feature sums and counts of the owned rows."""
        total = torch.zeros(centroids.shape[0], centroids.shape[1], dtype=torch.float64)
        counts = torch.zeros(centroids.shape[0], dtype=torch.float64)
        for start, feats in self._feature_chunks():
            feats = feats[: max(0, self.n_owned - start)]
            s, c = clusters.sums(feats, centroids)
            total += s
            counts += c
        return total, counts

    def set_centroids(self, centroids: torch.Tensor) -> list[int]:
        """Every held sample's label becomes its nearest centroid (and so will a shard loaded later); returns the
        owned samples' cluster sizes."""
        self.centroids = centroids
        for start, feats in self._feature_chunks():
            self.y[start : start + feats.shape[0]] = clusters.nearest(feats, centroids).to(self.y.device)
        return torch.bincount(self.y[: self.n_owned].cpu(), minlength=centroids.shape[0]).tolist()

    def _cache_natives(self, natives: list[DecodedImage], same: bool) -> list[DecodedImage] | DiskShard | None:
        """Where to keep a shard's native images (``--cache``), None for nowhere: never kept when the stop check does
        not need them (the working images are the natives and the release is PNG); ``memory`` always in memory;
        ``disk`` always on local disk; ``none`` never; ``auto`` in memory while this worker's kept natives stay
        within ``--cache-memory-gb``."""
        mode = self.cfg.cache
        if (same and self.cfg.encode_format not in LOSSY_FORMATS) or mode == "none":
            return None
        if self.disk_cache is not None:
            return self.disk_cache.put(natives)
        size = sum(n.color.numel() + (0 if n.alpha is None else n.alpha.numel()) for n in natives)
        if mode == "auto" and self.cached_bytes + size > self.cache_budget:
            if self.cached_bytes <= self.cache_budget:
                log.info(
                    "worker %d: native images over the --cache budget of %.1f GB from shard %d on: the stop "
                    "check streams those shards from the input",
                    self.index,
                    self.cache_budget / 1e9,
                    len(self.shards),
                )
            self.cached_bytes += size  # counted, not kept: the next shards are streamed too
            return None
        self.cached_bytes += size
        return natives

    def _natives(self, sd: ShardData) -> Iterator[DecodedImage]:
        """A shard's accepted images at native size, in order: kept ones (memory or disk), or decoded again from the
        input."""
        if sd.natives is not None:
            yield from sd.natives
            return
        for _, result, index in reread(sd.id, iter_samples(sd.url), sd.keys, self.rules, self.threads):
            if index is not None:
                yield result.image

    def set_global_rows(self, offsets: dict[str, int], total: int) -> None:
        """Where this worker's owned shards sit in the whole corpus: ``offsets`` maps each shard of the plan to its
        first row in the plan's order (accepted samples only), ``total`` is the corpus' accepted samples."""
        rows = torch.full((total,), -1, dtype=torch.long)
        for shard in self.owned:
            sd = self.shards[shard]
            rows[offsets[shard] : offsets[shard] + sd.end - sd.start] = torch.arange(sd.start, sd.end)
        self.global_rows = rows


class LoadStage:
    """The coordinator's side (a part of ``Run``): the pool started and loaded, the clusters."""

    def start_workers(self) -> None:
        """Start the pool, share the shards out and load them (every worker streams its own shards in parallel)."""
        cfg, plan = self.cfg, self.plan
        n, gpus_each, cpus_each = self.pool.pool_size(cfg.workers, cfg.gpus_per_worker, cfg.cpus_per_worker)
        if n > len(plan.shards):
            log.warning(
                "%d workers asked for but the corpus has %d shard(s): starting %d",
                n,
                len(plan.shards),
                len(plan.shards),
            )
            n = len(plan.shards)
        self.workers = self.pool.start_workers(cfg.to_dict(), plan.num_classes, plan.channels, n, gpus_each, cpus_each)
        shares = assign_shards(plan.shards, n)
        self.owner = {s.id: i for i, share in enumerate(shares) for s in share}
        log.info("loading %d shard(s), %d samples, on %d worker(s)", len(plan.shards), plan.total_samples, n)
        self.heartbeat.phase("load")
        t0 = time.perf_counter()
        # Each worker streams its shards' results as it loads them: a progress line per shard, with the pace.
        streams = {
            w.load_shards_streamed.remote([(s.id, s.url) for s in share]): i
            for i, (w, share) in enumerate(zip(self.workers, shares))
        }
        results, samples = [], 0
        while streams:
            ready, _ = self.pool.wait(list(streams))
            for stream in ready:
                r = self.pool.next_of(stream)
                if r is None:
                    del streams[stream]
                    continue
                results.append(r)
                samples += r["accepted"] + r["rejected"]
                elapsed = time.perf_counter() - t0
                log.info(
                    "load: %d/%d shards loaded (%s on worker %d), %.0f images/s%s",
                    len(results),
                    len(plan.shards),
                    r["shard"],
                    streams[stream],
                    samples / max(elapsed, 1e-9),
                    eta(samples, plan.total_samples, elapsed),
                )
        seconds = time.perf_counter() - t0
        self.timings["load"] += seconds
        for r in results:
            if r["read_error"]:
                log.warning("shard %s: %s", r["shard"], r["read_error"])
        accepted = sum(r["accepted"] for r in results)
        log.info(
            "loaded %d shard(s) on %d worker(s): %d samples accepted, %d rejected, %.1f s (%.0f images/s)",
            len(results),
            n,
            accepted,
            sum(r["rejected"] for r in results),
            seconds,
            accepted / max(seconds, 1e-9),
        )
        if accepted == 0:
            raise ConfigRefused("no sample of the corpus can be protected (every sample was rejected)")
        # Every worker learns where its rows sit in the whole corpus (the plan's order): the pool then draws one
        # worker's batches (pipeline.worker.train_stage).
        counts = {r["shard"]: r["accepted"] for r in results}
        offsets, total = {}, 0
        for s in plan.shards:
            offsets[s.id] = total
            total += counts[s.id]
        self.pool.get_all([w.set_global_rows.remote(offsets, total) for w in self.workers])
        if cfg.labels == "cluster":
            self._cluster_labels()

    def _cluster_labels(self) -> None:
        """--labels cluster: every sample's label becomes its k-means cluster (``pipeline.clusters``), from the
        centroids this run committed, or from a k-means over the pool committed now."""
        layout = self.layout
        self.heartbeat.phase("cluster")
        try:
            centroids = clusters.from_bytes(load_checked(layout.clusters, layout.clusters_marker, self.chash))
            how = "the run's committed centroids"
        except DamagedUnit:
            t0 = time.perf_counter()
            workers = self.workers

            def lloyd_sums(centroids):  # the centroids go into the object store once, not once per worker
                ref = self.pool.put(centroids)
                return self.pool.get_all([w.cluster_sums.remote(ref) for w in workers])

            centroids, iterations = clusters.kmeans(
                lambda m: self.pool.get_all([w.cluster_candidates.remote(m) for w in workers]),
                lloyd_sums,
                self.plan.num_classes,
                self.cfg.seed,
            )
            commit(
                layout.clusters, clusters.to_bytes(centroids), layout.clusters_marker, self.chash, iterations=iterations
            )
            how = f"k-means, {iterations} iteration(s), {time.perf_counter() - t0:.1f} s"
        ref = self.pool.put(centroids)
        sizes = [sum(c) for c in zip(*self.pool.get_all([w.set_centroids.remote(ref) for w in self.workers]))]
        log.info("--labels cluster: %d groups (%s); sizes %s", len(sizes), how, sizes)

    def stop_workers(self) -> None:
        for w in self.workers:
            self.pool.kill(w)
        self.workers = []


def cache_budget(gigabytes: float | None) -> int:
    """``--cache auto``'s budget for one worker's native images in bytes: ``gigabytes``, or a fifth of the node's
    physical memory."""
    if gigabytes is not None:
        return int(gigabytes * 1e9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CACHE_SHARE_OF_MEMORY)
