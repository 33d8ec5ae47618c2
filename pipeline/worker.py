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
from datetime import timedelta

import torch
import torch.distributed as dist

from ops.engine import NoiseEngine, compile_args
from ops.noise import decode_noise, encode_noise
from ops.robust import robust_adversary, robust_spec
from pipeline.config import ProtectConfig
from pipeline.native_cache import DiskCache
from pipeline.rows import RowFile
from pipeline.samples import SampleRules
from pipeline.stages.check import CheckWork
from pipeline.stages.export import ExportWork
from pipeline.stages.load import LoadWork, ShardData, cache_budget
from pipeline.stages.noise import NoiseWork
from pipeline.stages.probe import ProbeWork
from pipeline.stages.train import TrainWork
from surrogates import build
from surrogates.distributed import pool_batch_norm
from surrogates.training import make_optimizer

log = logging.getLogger(__name__)
# --cache auto without --cache-memory-gb: a worker keeps native images up to this share of its node's memory.
CACHE_SHARE_OF_MEMORY = 0.2


class RoundWorker(LoadWork, TrainWork, NoiseWork, CheckWork, ProbeWork, ExportWork):
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
