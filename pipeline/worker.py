"""A worker: holds a surrogate, its optimiser and its share of the corpus, and runs the stages of a round on them.

This is plain Python: ``pipeline.pool`` wraps it as a Ray actor, and bench or GPU checks can call it in-process.
Images are decoded once, at load, to uint8 tensors at the working resolution (plus the native pixels, which the
released-data stop check and the export need); the noise state stays on the worker's device across rounds.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from ops import metrics
from ops.engine import CONVERGED_LOSS, NoiseEngine, compile_args, to_device
from ops.image import (
    ENCODE_FORMATS,
    LOSSY_FORMATS,
    DecodedImage,
    decoded_release,
    encode_image,
    encoded_roundtrip,
    match_channels,
    release_native,
    release_native_batch,
    resize_uint8,
    to_working,
)
from ops.noise import apply_classwise_update, decode_noise, encode_noise, release_uint8
from ops.robust import robust_adversary, robust_spec
from pipeline import clusters, faults
from pipeline.config import ProtectConfig
from pipeline.native_cache import DiskCache, DiskShard
from pipeline.probe import probe_sample, probe_score
from pipeline.samples import Rejected, SampleRules, ordered_map, prepare_each, released_members
from pipeline.storage import manifest
from pipeline.storage.layout import Layout
from pipeline.storage.markers import commit_files
from pipeline.storage.shards import RawSample, ShardReadError, iter_samples, read_ahead, write_tar
from surrogates import build
from surrogates.distributed import pool_batch_norm
from surrogates.training import load_checkpoint, make_optimizer, predict, save_checkpoint, train_step

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


class RoundWorker:
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
        self.robust = robust_spec(self.cfg.robust, self.cfg.eps)
        # The noise stage's engine (bf16 autocast, channels_last and torch.compile where the device pays for them).
        self.engine = NoiseEngine(self.model, eps=self.cfg.eps, step_size=self.cfg.step_size,
                                  steps=self.cfg.pgd_steps, precision=self.cfg.precision, robust=self.robust,
                                  seed=self.cfg.seed, **compile_args(self.cfg.compile))
        # The train stage's attacks draw from their own stream, so that the batch stream (self.generator) stays the
        # same on every worker of a pool whatever each attacks.
        self.attack_generator = torch.Generator().manual_seed(self.cfg.seed)
        self.adversary = (None if self.robust is None else
                          robust_adversary(self.robust, self.attack_generator, autocast=self.engine.autocast))
        # The same stream on every worker of a pool: each draws the pool's global batch and keeps its own rows of it.
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.rules = SampleRules(num_classes, self.cfg.max_pixels, self.cfg.image_key, self.cfg.label_key,
                                 self.cfg.label_names, encode_format=self.cfg.encode_format,
                                 cluster=self.cfg.labels == "cluster")
        self.centroids: torch.Tensor | None = None  # --labels cluster: set once the pool has clustered
        self.cached_bytes = 0  # native images counted against --cache auto's budget
        self.cache_budget = cache_budget(self.cfg.cache_memory_gb)
        self.disk_cache = DiskCache() if self.cfg.cache == "disk" else None
        r = self.cfg.resolution
        self.x = torch.empty(0, channels, r, r, dtype=torch.uint8, device=self.device)
        self.y = torch.empty(0, dtype=torch.long, device=self.device)
        self.delta = torch.empty(0, channels, r, r, device=self.device)  # sample-wise noise, one row per sample
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
        # The shards' rows join the worker's tensors once, after the last shard: growing them shard by shard would
        # copy them again for every shard and hold two copies at each step.
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        for (shard, url), items in zip(shards, read_ahead([u for _, u in shards])):
            result, x, y = self._decode(shard, url, items, self.x.shape[0] + sum(len(r[1]) for r in rows))
            rows.append((x, y))
            self.owned.append(shard)
            yield result
        self._append_rows(rows)
        self.n_owned = self.x.shape[0]

    def load_shard(self, shard: str, url: str) -> dict:
        """One shard (see ``load_shards``)."""
        return self.load_shards([(shard, url)])[0]

    def _append_rows(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Decoded shards' working images and labels after the rows held, with zero noise: uploaded once, through
        pinned host memory on a GPU (ops.engine.to_device)."""
        if not rows:
            return
        x = to_device(torch.cat([r[0] for r in rows]), self.device)
        y = to_device(torch.cat([r[1] for r in rows]), self.device)
        held = self.x.shape[0] > 0
        self.x = torch.cat([self.x, x]) if held else x
        self.y = torch.cat([self.y, y]) if held else y
        zeros = torch.zeros(x.shape, device=self.device)
        self.delta = torch.cat([self.delta, zeros]) if held else zeros

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
        result = {"shard": shard, "accepted": len(keys), "rejected": rejected, "read_error": read_error,
                  "seconds": time.perf_counter() - t0}
        return result, x, torch.tensor(labels, dtype=torch.long)

    # ---- --labels cluster (pipeline.clusters) --------------------------------------------------------------------
    def _feature_chunks(self, chunk: int = 16384) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, features) of every held row, a chunk at a time (a million rows never in memory at once)."""
        for start in range(0, self.x.shape[0], chunk):
            yield start, clusters.features(self.x[start : start + chunk].cpu())

    def cluster_candidates(self, m: int) -> list[tuple[str, torch.Tensor]]:
        """This worker's ``m`` owned samples of smallest key hash (the k-means++ candidates): (hash, features)."""
        ranked = sorted((clusters.key_rank(k, self.cfg.seed), sd.start + i) for s in self.owned
                        for sd in (self.shards[s],) for i, k in enumerate(sd.keys))[:m]
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
                log.info("worker %d: native images over the --cache budget of %.1f GB from shard %d on: the stop "
                         "check streams those shards from the input", self.index, self.cache_budget / 1e9,
                         len(self.shards))
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
        index = 0
        for _, result in prepare_each(iter_samples(sd.url), self.rules, self.threads):
            if isinstance(result, (ShardReadError, Rejected)):
                continue
            if index >= len(sd.keys) or sd.keys[index] != result.key:
                raise RuntimeError(f"shard {sd.id} changed since it was loaded (sample {result.key})")
            index += 1
            yield result.image
        if index != len(sd.keys):
            raise RuntimeError(f"shard {sd.id} changed since it was loaded: {index} of {len(sd.keys)} samples found")

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
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
        with torch.no_grad():
            for t in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(t, src=0)
        return backend

    def _all_reduce_grads(self, grads: list[torch.Tensor]) -> None:
        """Sum each gradient over the pool: every worker's loss is its rows' share of the global batch's mean."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _sync_buffers(self) -> None:
        """Rank 0's buffers to every worker. Batch norm's running statistics are already the pool's (computed from the
        all-reduced batch statistics); this makes them bit-identical and carries any other buffer."""
        with torch.no_grad():
            for b in self.model.buffers():
                dist.broadcast(b, src=0)

    def _noise_rows(self, sl: slice) -> torch.Tensor:
        if self.cfg.mode == "samplewise":
            return self.delta[sl]
        return self.class_delta[self.y[sl]]

    # ---- stage 1: surrogate training ------------------------------------------------------------------------
    def train_stage(self, round_: int | None = None) -> dict:
        """``train_steps`` SGD steps on random batches of clip(x + delta) drawn from the whole corpus.

        A pool takes one worker's steps: every worker draws the same global batch (same seed, same permutation of the
        corpus' rows) and computes the rows of it that it owns; batch norm normalises by the global batch's
        statistics (``surrogates.distributed``); each worker's loss is its rows' share of the global mean, and the
        gradients are summed over the pool (all-reduce) before the step. One worker and a pool differ only by the
        order of floating-point sums.
        """
        faults.at_unit("worker", "train", round_)
        t0 = time.perf_counter()
        if round_ is not None:  # the batches of a round depend on (seed, round) only: a resumed round redraws them
            self.generator.manual_seed(self.cfg.seed + 7919 * (round_ + 1))
            self.attack_generator.manual_seed(self.cfg.seed + 1000 * self.rank + 7919 * (round_ + 1))
        rows = self.global_rows
        if rows is None:
            if self.world > 1:
                raise RuntimeError("a pool worker trains only after set_global_rows")
            rows = torch.arange(self.n_owned)
        total = rows.numel()
        batch = min(total, self.cfg.batch_size)
        hook = self._all_reduce_grads if self.world > 1 else None
        loss_sum = 0.0
        steps = self.cfg.train_steps if total else 0
        for _ in range(steps):
            local = rows[torch.randperm(total, generator=self.generator)[:batch]]
            idx = local[local >= 0].to(self.device)
            xb = (self.x[idx].to(torch.float32) / 255.0 + self._noise_rows(idx)).clamp_(0.0, 1.0)
            # In the engine's precision and memory format (bf16 autocast, channels_last on a GPU; fp32 on a CPU).
            loss_sum += train_step(self.model, self.optimizer, self.engine.format(xb), self.y[idx],
                                   all_reduce=hook, autocast=self.engine.autocast, adversary=self.adversary,
                                   global_batch=batch if self.world > 1 else None)
        loss = loss_sum / max(steps, 1)
        if self.world > 1:
            self._sync_buffers()
            total_loss = torch.tensor([loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(total_loss)  # each worker's share of the mean: the sum is the pool's mean loss
            loss = float(total_loss)
        return {"loss": loss, "seconds": time.perf_counter() - t0}

    # ---- stage 2: noise update --------------------------------------------------------------------------------
    def noise_stage(self, shard: str, round_: int | None = None) -> dict:
        """Update the noise of one shard's samples (sample-wise), or add its class updates to the sums (class-wise).

        Sample-wise with ``skip_converged``, samples whose surrogate loss on their released image is already below
        ``ops.engine.CONVERGED_LOSS`` keep their noise this round; ``image_steps`` counts the steps actually done.
        ``round_`` only names the unit for logs and fault hooks."""
        faults.at_unit("worker", "noise", round_, shard)
        t0 = time.perf_counter()
        sd = self.shards[shard]
        cfg = self.cfg
        self.model.eval()
        # The robust update's draws depend on (seed, round, shard) only: a resumed stage or a guest worker computes
        # the same noise. (Plain noise draws nothing.)
        self.engine.reseed(zlib.crc32(f"{cfg.seed}:{round_}:{shard}".encode()))
        sl = slice(sd.start, sd.end)
        n = sd.end - sd.start
        if cfg.mode == "samplewise":
            delta, done = self.engine.update_samplewise(
                self.x[sl], self.y[sl], self.delta[sl], batch_size=cfg.noise_batch_size,
                skip_below=CONVERGED_LOSS if cfg.skip_converged else None)
            # The state a rerun resumes from is the quantised one: keep exactly that, so resumed == uninterrupted.
            self.delta[sl] = decode_noise(encode_noise(delta, cfg.eps), cfg.eps)
            updated, image_steps = done.updated, done.image_steps
        else:
            for start in range(sd.start, sd.end, cfg.noise_batch_size):
                b = slice(start, min(start + cfg.noise_batch_size, sd.end))
                sums, counts = self.engine.classwise_sums(self.x[b].to(torch.float32) / 255.0, self.y[b],
                                                          self.class_delta, pad_to=cfg.noise_batch_size)
                self._class_sums += sums
                self._class_counts += counts
            updated, image_steps = n, n * cfg.pgd_steps
        return {"shard": shard, "samples": n, "updated": updated, "image_steps": image_steps,
                "seconds": time.perf_counter() - t0}

    def noise_stage_guest(self, shard: str, round_: int, url: str, state: bytes | None) -> dict:
        """The noise stage of a shard another worker owns (this one was idle): load it once and keep it as a guest
        (not trained on, checked or exported here), take its noise from ``state`` (round_ - 1's, checked by the
        coordinator; None in round 0), update it."""
        if shard not in self.shards:
            _, x, y = self._decode(shard, url, iter_samples(url), self.x.shape[0])
            self._append_rows([(x, y)])
        if self.cfg.mode == "samplewise":
            sd = self.shards[shard]
            if state is not None:
                self.load_noise_state(shard, state)
            else:
                self.delta[sd.start : sd.end] = 0.0
        return {**self.noise_stage(shard, round_), "guest": True}

    def class_update_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's class-wise sums of the stage (to be added across workers), then reset."""
        # A copy: on a CPU worker .cpu() returns the same tensor, which the reset below would zero before it is sent.
        sums, counts = self._class_sums.to("cpu", copy=True), self._class_counts.to("cpu", copy=True)
        self._class_sums.zero_()
        self._class_counts.zero_()
        return sums, counts

    def apply_class_update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        delta = apply_classwise_update(self.class_delta, sums.to(self.device), counts.to(self.device), self.cfg.eps)
        self.class_delta = decode_noise(encode_noise(delta, self.cfg.eps), self.cfg.eps)

    # ---- noise state and checkpoints (the work dir) ------------------------------------------------------------
    def noise_state(self, shard: str | None) -> bytes:
        """int8 noise state in units of eps/127: one shard's rows, or the class noise (``shard=None``)."""
        if shard is None:
            q = encode_noise(self.class_delta, self.cfg.eps).cpu()
            keys = None
        else:
            sd = self.shards[shard]
            q = encode_noise(self.delta[sd.start : sd.end], self.cfg.eps).cpu()
            keys = sd.keys
        buf = io.BytesIO()
        torch.save({"q": q, "keys": keys}, buf)
        return buf.getvalue()

    def load_noise_state(self, shard: str | None, data: bytes) -> None:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        delta = decode_noise(state["q"], self.cfg.eps).to(self.device)
        if shard is None:
            self.class_delta = delta
            return
        sd = self.shards[shard]
        if state["keys"] != sd.keys:
            raise ValueError(f"noise state of shard {shard} does not match its samples (input changed?)")
        self.delta[sd.start : sd.end] = delta

    def checkpoint(self) -> bytes:
        return save_checkpoint(self.model, self.optimizer, self.generator)

    def restore(self, data: bytes) -> None:
        load_checkpoint(data, self.model, self.optimizer, self.generator)

    # ---- stage 3: the stop check on released data ------------------------------------------------------------
    def released_working(self, shard: str) -> torch.Tensor:
        """What a victim sees of this shard: released uint8 at native size, resized to the working resolution.

        Computed on the worker's device, the images of one native size together (``release_native_batch``): on a
        GPU no per-sample host work even when natives differ from the working size. Same pixels as the export's
        per-image ``release_native`` on the same device (tested)."""
        sd = self.shards[shard]
        sl = slice(sd.start, sd.end)
        noise = self._noise_rows(sl)
        if self.cfg.encode_format in LOSSY_FORMATS:
            return self._released_lossy(sd, noise)
        if sd.native_is_working:
            return release_uint8(self.x[sl], noise)
        r = self.cfg.resolution
        out = torch.empty_like(self.x[sl])
        # A GPU takes a batch's worth at once; a CPU is fastest a few images at a time (a 128-image chunk of 256-px
        # photos ran at half the per-image speed here: the float intermediates overflow the caches).
        chunk = self.cfg.noise_batch_size if self.device.type == "cuda" else 4
        for part in _size_groups(self._natives(sd), chunk):
            colors = to_device(torch.stack([nat.color for _, nat in part]), self.device)
            idx = torch.tensor([i for i, _ in part], device=self.device)
            released = release_native_batch(colors, noise[idx])
            out[idx] = resize_uint8(match_channels(released, self.channels), (r, r))
        return out

    def _released_lossy(self, sd: ShardData, noise: torch.Tensor) -> torch.Tensor:
        """``released_working`` of a JPEG or WebP release: each released image encoded as the export encodes it and
        decoded again, on the host, image by image (``encoded_roundtrip``: the same pixels as the release's bytes)."""
        r, cfg = self.cfg.resolution, self.cfg
        noise = noise.cpu()

        def one(job: tuple[int, DecodedImage]) -> torch.Tensor:
            i, nat = job
            released = encoded_roundtrip(release_native(nat.color, noise[i]), nat.alpha, cfg.encode_format,
                                         cfg.encode_quality)
            return to_working(released, r, self.channels)

        rows = list(ordered_map(one, enumerate(self._natives(sd)), self.threads))
        out = torch.stack(rows) if rows else torch.empty(0, self.channels, r, r, dtype=torch.uint8)
        return to_device(out, self.device)

    def released_error(self) -> dict:
        """The surrogate's errors on the released data of every shard this worker holds (summed by the caller)."""
        t0 = time.perf_counter()
        wrong = total = 0
        for shard in self.owned:
            sd = self.shards[shard]
            if sd.end == sd.start:
                continue
            # In the engine's precision and memory format, as the train stage; uint8 levels to floats a batch at a time.
            pred = predict(self.model, self.released_working(shard), self.cfg.noise_batch_size,
                           autocast=self.engine.autocast,
                           prepare=lambda batch: self.engine.format(batch.to(torch.float32) / 255.0))
            wrong += int((pred != self.y[sd.start : sd.end]).sum())
            total += sd.end - sd.start
        return {"wrong": wrong, "total": total, "seconds": time.perf_counter() - t0}

    def probe_data(self, fraction: float = 1.0) -> dict:
        """Released and clean working images, labels and keys of the probe's sample of the samples held (``fraction``
        of them, by a hash of the key: ``pipeline.probe.probe_sample``), and how many rows are each shard's (for
        the protection probe). A shard's released images are computed, sampled and dropped one shard at a time."""
        released, clean, labels, keys, counts = [], [], [], [], []
        for shard in self.owned:
            sd = self.shards[shard]
            chosen = probe_sample(sd.keys, fraction)
            rows = torch.arange(sd.start, sd.end)[chosen]
            released.append(self.released_working(shard).cpu()[chosen])
            clean.append(self.x[rows.to(self.x.device)].cpu())
            labels.append(self.y[rows.to(self.y.device)].cpu())
            keys.extend(k for k, c in zip(sd.keys, chosen.tolist()) if c)
            counts.append((shard, int(chosen.sum())))
        r = self.cfg.resolution
        empty = torch.empty(0, self.channels, r, r, dtype=torch.uint8)
        return {
            "released": torch.cat(released) if released else empty,
            "clean": torch.cat(clean) if clean else empty,
            "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
            "keys": keys,
            "shards": counts,
        }

    def probe_score(self, source: str, *parts: dict, countermeasure: str = "none", order: list[str] | None = None
                    ) -> dict:
        """Train the protection probe on ``source`` ("released" or "clean") images of the whole corpus: ``parts``
        are every worker's ``probe_data`` (this one's included), their shards put in ``order`` (the plan's: a pool
        probes the same rows in the same order as one worker; default: as the parts come); ``countermeasure`` as an
        informed adversary trains (``pipeline.probe.probe_score``)."""
        pieces = {}
        for part in parts:
            start = 0
            for shard, count in part["shards"]:
                pieces[shard] = (part, start, start + count)
                start += count
        ordered = [pieces[s] for s in (order or pieces)]
        data = {k: torch.cat([p[k][a:b] for p, a, b in ordered]) for k in ("released", "clean", "labels")}
        data["keys"] = [k for p, a, b in ordered for k in p["keys"][a:b]]
        cfg = self.cfg
        return probe_score(data, source, arch=cfg.probe_arch, steps=cfg.probe_steps, num_classes=self.num_classes,
                           seed=cfg.seed, countermeasure=countermeasure)

    # ---- export -----------------------------------------------------------------------------------------------
    def export_shard(self, shard: str, output: str, work: str, config_hash: str) -> dict:
        """Write ``<shard>.tar`` and ``<shard>.parquet``, verify them, then the ``<shard>_stats.json`` marker."""
        faults.at_unit("worker", "export", None, shard)
        t0 = time.perf_counter()
        layout = Layout(output, work)
        sd = self.shards[shard]
        noise = self._noise_rows(slice(sd.start, sd.end)).cpu()
        labels = self.y[sd.start : sd.end].tolist()  # the labels trained on (with --labels cluster, the clusters)
        index = 0
        read_error = None
        # The export decodes the photos' metadata too: the ICC profile always goes with the pixels; EXIF and XMP
        # (GPS position, camera, time) only with --keep-metadata.
        rules = replace(self.rules, metadata=True)
        keep = self.cfg.keep_metadata
        fmt = self.cfg.encode_format
        ext = ENCODE_FORMATS[fmt]

        def released() -> Iterator[tuple]:
            """In shard order: a finished manifest row (rejections), or a released image still to encode."""
            nonlocal index, read_error
            for item, result in prepare_each(iter_samples(sd.url), rules, self.threads):
                if isinstance(result, ShardReadError):
                    read_error = result.message
                    continue
                if isinstance(result, Rejected):
                    yield manifest.row(result.key, shard, "rejected", error=result.error, label=result.label,
                                       source_sha256=result.source_sha256), None
                    continue
                if index >= len(sd.keys) or sd.keys[index] != result.key:
                    raise RuntimeError(f"shard {shard} changed since it was loaded (sample {result.key})")
                image = release_native(result.image.color, noise[index])
                row = {"label": labels[index], "width": result.image.width, "height": result.image.height,
                       "source_sha256": result.source_sha256, "output_member": f"{result.key}.{ext}"}
                index += 1
                yield row, (item, result, image)

        def encode(job: tuple) -> tuple[dict, RawSample | None]:
            row, accepted = job
            if accepted is None:
                return row, None
            item, result, image = accepted
            decoded = result.image
            # zlib (or the JPEG / WebP encoder): the slow part of the export, on the threads
            data = encode_image(image, decoded.alpha, fmt=fmt, quality=self.cfg.encode_quality, icc=decoded.icc,
                                exif=decoded.exif if keep else None, xmp=decoded.xmp if keep else None)
            # The image quality of what a victim decodes: for a lossy release, the codec's error is in it.
            released = image if fmt == "png" else decoded_release(data, image.shape[0])
            original = decoded.color
            row.update(linf=metrics.linf(released, original), l2=metrics.l2(released, original),
                       psnr=metrics.psnr(released, original))
            sample = RawSample(result.key, released_members(item, data, result.image_member, ext))
            return manifest.row(result.key, shard, "protected", output_sha256=_sha256(data), **row), sample

        rows: list[dict] = []
        out_samples: list[RawSample] = []
        for row, sample in ordered_map(encode, released(), self.threads):
            rows.append(row)
            if sample is not None:
                out_samples.append(sample)
        if index != len(sd.keys):
            raise RuntimeError(f"shard {shard} changed since it was loaded: {index} of {len(sd.keys)} samples found")
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
        files = {"tar": (layout.shard_tar(shard), tar_bytes),
                 "manifest": (layout.shard_manifest(shard), manifest_bytes)}
        stats.update(commit_files(files, layout.shard_marker(shard), config_hash,
                                  seconds=round(time.perf_counter() - t0, 3), **stats))
        return stats


def cache_budget(gigabytes: float | None) -> int:
    """``--cache auto``'s budget for one worker's native images in bytes: ``gigabytes``, or a fifth of the node's
    physical memory."""
    if gigabytes is not None:
        return int(gigabytes * 1e9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CACHE_SHARE_OF_MEMORY)


def _size_groups(natives: Iterator[DecodedImage], chunk: int, pending_limit: int = 64
                 ) -> Iterator[list[tuple[int, DecodedImage]]]:
    """(row, image) pairs of one native size, at most ``chunk`` together, as ``natives`` stream by; at most
    ``pending_limit`` images wait for company (each row's pixels do not depend on its group: tested)."""
    pending: dict[tuple, list[tuple[int, DecodedImage]]] = {}
    waiting = 0
    for i, nat in enumerate(natives):
        group = pending.setdefault(tuple(nat.color.shape), [])
        group.append((i, nat))
        waiting += 1
        if len(group) == chunk:
            yield pending.pop(tuple(nat.color.shape))
            waiting -= chunk
        elif waiting >= pending_limit:
            yield from pending.values()
            pending, waiting = {}, 0
    yield from pending.values()


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
