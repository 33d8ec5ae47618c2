"""A worker: holds a surrogate, its optimiser and its share of the corpus, and runs the stages of a round on them
(their work is in ``pipeline.stages``, one module per stage).

This is plain Python: ``pipeline.executor.ray_pool`` wraps it as a Ray actor; ``pipeline.executor.local`` holds one
in this process. Images are decoded once, at load, to uint8 tensors at the working resolution (plus the native
pixels where the stop check needs them: ``--cache``); the working images and the noise stay on the worker's device
across rounds, or in files on its local disk (``pipeline.rows``: ``--cache disk`` and ``none``, ``auto`` over budget).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ops.engine import NoiseEngine, compile_args, to_device
from ops.image import (
    LOSSY_FORMATS,
    DecodedImage,
    to_working,
)
from ops.noise import decode_noise, encode_noise
from ops.robust import robust_adversary, robust_spec
from pipeline import clusters
from pipeline.config import ProtectConfig
from pipeline.native_cache import DiskCache, DiskShard
from pipeline.rows import RowFile
from pipeline.samples import Rejected, SampleRules, prepare_each, reread
from pipeline.stages.check import CheckWork
from pipeline.stages.export import ExportWork
from pipeline.stages.noise import NoiseWork
from pipeline.stages.probe import ProbeWork
from pipeline.stages.train import TrainWork
from pipeline.storage.shards import ShardReadError, iter_samples, read_ahead
from surrogates import build
from surrogates.distributed import pool_batch_norm
from surrogates.training import make_optimizer

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


class RoundWorker(TrainWork, NoiseWork, CheckWork, ProbeWork, ExportWork):
    """A worker's data (its shards' working images and noise on its device or local disk, labels on its device; the
    natives as ``--cache`` says), its surrogate, and its place in the pool. The stages' work on them is in
    ``pipeline.stages``, one module per stage; Ray calls them as this actor's methods."""

    def __init__(self, cfg: dict, num_classes: int, channels: int, index: int = 0, threads: int | None = None):
        self.cfg = ProtectConfig(**cfg)
        self.index = index
        self.num_classes = num_classes
        self.channels = channels
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.threads = torch.get_num_threads()  # also the decode and PNG-encode threads (pipeline.samples)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(self.cfg.seed)
        self.model = build(self.cfg.surrogate, num_classes, channels).to(self.device)
        self.optimizer = make_optimizer(self.model)
        # --robust on: REM's min-min-max with an expectation over transformations (ops.robust), in the noise stage
        # and, as the adversary of every training step, in the train stage.
        self.robust = robust_spec(self.cfg.robust, self.cfg.eps, self.cfg.robust_rho)
        # The noise stage's engine (bf16 autocast, channels_last and torch.compile where the device pays for them).
        self.engine = NoiseEngine(
            self.model,
            eps=self.cfg.eps,
            step_size=self.cfg.step_size,
            steps=self.cfg.pgd_steps,
            precision=self.cfg.precision,
            robust=self.robust,
            seed=self.cfg.seed,
            **compile_args(self.cfg.compile),
        )
        # The train stage's attacks draw from their own stream, so that the batch stream (self.generator) stays the
        # same on every worker of a pool whatever each attacks.
        self.attack_generator = torch.Generator().manual_seed(self.cfg.seed)
        self.adversary = (
            None
            if self.robust is None
            else robust_adversary(self.robust, self.attack_generator, autocast=self.engine.autocast)
        )
        # The same stream on every worker of a pool: each draws the pool's global batch and keeps its own rows of it.
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.rules = SampleRules(
            num_classes,
            self.cfg.max_pixels,
            self.cfg.image_key,
            self.cfg.label_key,
            self.cfg.label_names,
            encode_format=self.cfg.encode_format,
            cluster=self.cfg.labels == "cluster",
        )
        self.centroids: torch.Tensor | None = None  # --labels cluster: set once the pool has clustered
        self.cached_bytes = 0  # native images counted against --cache auto's budget
        self.cache_budget = cache_budget(self.cfg.cache_memory_gb)
        self.disk_cache = DiskCache() if self.cfg.cache == "disk" else None
        r = self.cfg.resolution
        # The working images (uint8) and the sample-wise noise, one row per sample, as the int8 levels the work dir
        # keeps (ops.noise.encode_noise: units of eps/127): a quarter of float32's memory, and exactly the noise every
        # stage uses (rounds keep it quantised so that a resumed run equals an uninterrupted one); ``noise_rows``
        # decodes rows as needed. On the device, or in a file on local disk (``pipeline.rows``): with --cache disk
        # or none, and with auto when the share would not fit the budget (decided at the first shard loaded).
        self.rows_on_disk: bool | None = {"disk": True, "none": True, "memory": False}.get(self.cfg.cache)
        self.x: torch.Tensor | RowFile = torch.empty(0, channels, r, r, dtype=torch.uint8, device=self.device)
        self.noise_q: torch.Tensor | RowFile = torch.empty(0, channels, r, r, dtype=torch.int8, device=self.device)
        if self.rows_on_disk:
            self._rows_to_disk()
        self.y = torch.empty(0, dtype=torch.long, device=self.device)
        self.class_delta = torch.zeros(num_classes, channels, r, r, device=self.device)
        self._class_sums = torch.zeros_like(self.class_delta)
        self._class_counts = torch.zeros(num_classes, device=self.device)
        self.shards: dict[str, ShardData] = {}  # every shard held: its own, and guests taken over in a noise stage
        self.owned: list[str] = []  # the shards this worker trains on, checks, probes and exports
        self.n_owned = 0  # rows [0, n_owned) of x, y and delta are the owned shards'; guest rows follow
        # Row i of the whole corpus (the plan's shard order) -> this worker's row of it, or -1 where another worker
        # holds it (``set_global_rows``); None: the corpus is this worker's owned rows.
        self.global_rows: torch.Tensor | None = None
        self.rank, self.world = index, 1

    # ---- data -------------------------------------------------------------------------------------------------
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

    # ---- data-parallel training across the pool (torch.distributed) -------------------------------------------
    def free_port(self) -> int:
        """A free TCP port on this worker's machine, for the process group's rendezvous (rank 0 asks)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_distributed(self, rank: int, world: int, address: str, port: int, ifname: str | None) -> str:
        """Join the pool's process group: NCCL on GPUs, gloo on CPUs; rank 0's weights become everyone's, and batch
        norm normalises by the pool's whole batch (``surrogates.distributed``)."""
        self.rank, self.world = rank, world
        if world == 1:
            return "none"
        pool_batch_norm(self.model)
        if ifname:  # the interface that carries the rendezvous address (loopback when the pool is on one machine)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world, timeout=timedelta(minutes=30)
        )
        with torch.no_grad():
            for t in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(t, src=0)
        return backend

    def noise_rows(self, sl) -> torch.Tensor:
        """The float noise of rows ``sl`` (a slice or an index tensor)."""
        if self.cfg.mode == "samplewise":
            return decode_noise(self.noise_q[sl], self.cfg.eps)
        return self.class_delta[self.y[sl]]

    def set_noise_rows(self, sl: slice, delta: torch.Tensor) -> None:
        """Keep ``delta`` (float, |delta| <= eps) as the sample-wise noise of rows ``sl``, quantised."""
        self.noise_q[sl] = encode_noise(delta, self.cfg.eps)

    # ---- stage 1: surrogate training ------------------------------------------------------------------------

    # ---- stage 2: noise update --------------------------------------------------------------------------------

    # ---- noise state and checkpoints (the work dir) ------------------------------------------------------------

    # ---- stage 3: the stop check on released data ------------------------------------------------------------

    # ---- export -----------------------------------------------------------------------------------------------


def cache_budget(gigabytes: float | None) -> int:
    """``--cache auto``'s budget for one worker's native images in bytes: ``gigabytes``, or a fifth of the node's
    physical memory."""
    if gigabytes is not None:
        return int(gigabytes * 1e9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CACHE_SHARE_OF_MEMORY)
