"""The worker pool on Ray: connect to a cluster (or start a local one), start the worker actors, call them.

This module and the coordinator are the only places that import ray.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator

import ray

from pipeline.plan import read_here, read_shard_record
from pipeline.worker import RoundWorker

log = logging.getLogger(__name__)
PLAN_TASKS_FROM = 16  # shards to read before the plan is worth Ray tasks
PLAN_TASKS_IN_FLIGHT = 256  # plan tasks submitted and not yet returned


def connect(address: str | None) -> bool:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a private local Ray; returns True if we started it.

    With neither, ``address="local"`` starts a new local instance rather than attaching to a stray head that
    another process started on this machine.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return False
    # Logical CPUs beyond the physical ones so that Ray's own tasks are not starved by the workers on 2 cores.
    ray.init(
        address="local",
        num_cpus=max(4, (os.cpu_count() or 1) + 2),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    return True


class PlanReader:
    """The plan's shard reader (``pipeline.plan.ShardReader``) on Ray: one task a shard, each writing its shard's
    record as it finishes, at most ``PLAN_TASKS_IN_FLIGHT`` at a time. Fewer than ``from_shards`` shards to read are
    read in this process instead (a local Ray takes seconds to start). Connects to ``address`` (``connect``) the first
    time it needs Ray; ``started`` is True when that started a local Ray, which the caller shuts down."""

    def __init__(self, address: str | None, from_shards: int = PLAN_TASKS_FROM):
        self.address, self.from_shards, self.started = address, from_shards, False

    def __call__(self, jobs: list[tuple[dict, str | None]]) -> Iterator[tuple[int, dict]]:
        if len(jobs) < self.from_shards:
            yield from read_here(jobs)
            return
        self.started = connect(self.address) or self.started
        log.info("plan: reading %d shards as Ray tasks (%d at a time)", len(jobs), PLAN_TASKS_IN_FLIGHT)
        task = ray.remote(num_cpus=1, max_retries=2)(read_shard_record)
        which: dict = {}
        pending = iter(enumerate(jobs))
        while True:
            for i, (what, record_url) in itertools.islice(pending, PLAN_TASKS_IN_FLIGHT - len(which)):
                which[task.remote(what, record_url)] = i
            if not which:
                return
            done, _ = ray.wait(list(which), num_returns=1)
            try:
                record = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:  # the task's own error, as read_here would have raised it
                raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
            yield which.pop(done[0]), record


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


class PoolWorker(RoundWorker):
    """The Ray actor: a ``RoundWorker`` that can also say which machine it runs on."""

    def node(self) -> dict:
        return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}

    def init_distributed(self, rank: int, world: int, address: str, port: int, ifname: str | None) -> str:
        if ifname is None and world > 1:  # a multi-node pool: the interface that carries this node's address
            ifname = _interface_of(ray.util.get_node_ip_address())
        return super().init_distributed(rank, world, address, port, ifname)


def _interface_of(ip: str) -> str | None:
    """The network interface that carries ``ip`` on this machine (for GLOO/NCCL_SOCKET_IFNAME), if any."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return None


def gpu_worker_cpus(nodes: list[dict], gpus_per_worker: float) -> int:
    """CPUs for a GPU worker (its decode, encode and prefetch threads): its share of a GPU node's CPUs, i.e. the
    node's CPUs divided by its GPUs, times the worker's GPUs. ``nodes`` is ``ray.nodes()``; CPU-only nodes (a
    ``num-gpus: 0`` head) do not count, and with GPU nodes of different shapes the leanest one decides, so that a
    worker fits on any of them. At least 1."""
    ratios = []
    for node in nodes:
        res = node.get("Resources") or {}
        if node.get("Alive", True) and res.get("GPU", 0) > 0 and res.get("CPU", 0) > 0:
            ratios.append(res["CPU"] / res["GPU"])
    if not ratios:
        return 1
    return max(1, int(min(ratios) * gpus_per_worker + 1e-9))


def pool_size(
    workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float | None
) -> tuple[int, float, float]:
    """The defaults: one worker per GPU (else 1); 1 GPU each where the cluster has GPUs, else CPU actors
    with this machine's cores shared out (Ray's own tasks get the logical CPUs beyond the physical ones). A GPU
    worker gets its GPU node's CPUs divided by the node's GPUs (``gpu_worker_cpus``). ``--cpus-per-worker``
    overrides either; on a CPU-only cluster of other machines, pass it."""
    gpus = cluster_gpus()
    workers = workers or (max(1, gpus) if gpus else 1)
    if gpus_per_worker is None:
        gpus_per_worker = 1 if gpus else 0
    if cpus_per_worker is None:
        if gpus_per_worker:
            cpus_per_worker = gpu_worker_cpus(ray.nodes(), gpus_per_worker)
        else:
            cpus_per_worker = max(1, (os.cpu_count() or 1) // workers)
    return workers, gpus_per_worker, cpus_per_worker


def start_workers(
    cfg_dict: dict, num_classes: int, channels: int, workers: int, gpus_per_worker: float, cpus_per_worker: float
) -> list:
    """Start the pool and, with more than one worker, join it into one process group for data-parallel training."""
    log.info("starting %d worker(s): %s GPU and %s CPU each", workers, gpus_per_worker, cpus_per_worker)
    actor = ray.remote(PoolWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0)
    pool = [actor.remote(cfg_dict, num_classes, channels, i, max(1, int(cpus_per_worker))) for i in range(workers)]
    nodes = get([w.node.remote() for w in pool])
    if len({n["node_id"] for n in nodes}) == 1:
        # One machine: the rendezvous and the all-reduce stay on loopback.
        address, ifname = "127.0.0.1", _interface_of("127.0.0.1") or "lo"
    else:
        address, ifname = nodes[0]["ip"], None  # each worker finds its own interface for its node's address
    port = get(pool[0].free_port.remote())
    backends = get_all([w.init_distributed.remote(i, workers, address, port, ifname) for i, w in enumerate(pool)])
    if workers > 1:
        log.info("worker pool: %d workers, process group %s on %s:%d", workers, backends[0], address, port)
    return pool


class WorkerDied(RuntimeError):
    """A worker actor (or its process) died; the coordinator replaces it and resumes from the markers."""


def wait(refs: list, timeout: float | None = None) -> tuple[list, list]:
    """The refs that finished (at least one, unless ``timeout`` passes first) and those still running."""
    return ray.wait(refs, num_returns=1, timeout=timeout)


def next_of(stream):
    """The next result of a streaming actor call (an ``ObjectRefGenerator``), or None when it has ended."""
    try:
        ref = next(stream)
    except StopIteration:
        return None
    except _DIED as exc:
        raise _died(exc) from exc
    return get(ref)


def put(value):
    return ray.put(value)


_DIED = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)


def _died(exc: BaseException) -> WorkerDied:
    return WorkerDied(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def get(refs, timeout: float | None = None):
    try:
        return ray.get(refs, timeout=timeout)
    except _DIED as exc:
        raise _died(exc) from exc


def get_all(refs: list) -> list:
    """Every result, in order; the first failure raises at once (a dead worker must not leave the caller waiting on
    peers that are blocked in an all-reduce with it)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        get(done)
    return get(list(refs))


def kill(actor) -> None:
    if actor is not None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - it may already be gone, which is what we want
            log.debug("kill worker: %s", exc)


def shutdown(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()
