"""The worker pool on Ray: connect to a cluster (or start a local one), start the worker actors, call them.

This module and the coordinator are the only places that import ray.
"""

from __future__ import annotations

import logging
import os

import ray

from pipeline.worker import RoundWorker

log = logging.getLogger(__name__)


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
    ray.init(address="local", num_cpus=max(4, (os.cpu_count() or 1) + 2), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=True)
    return True


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def start_workers(cfg_dict: dict, num_classes: int, channels: int, workers: int | None,
                  gpus_per_worker: float | None, cpus_per_worker: float | None) -> list:
    gpus = cluster_gpus()
    workers = workers or (max(1, gpus) if gpus else 1)
    if gpus_per_worker is None:
        gpus_per_worker = 1 if gpus else 0
    if cpus_per_worker is None:
        cpus_per_worker = max(1, (os.cpu_count() or 1) // workers) if not gpus_per_worker else 1
    log.info("starting %d worker(s): %s GPU and %s CPU each", workers, gpus_per_worker, cpus_per_worker)
    actor = ray.remote(RoundWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0)
    return [actor.remote(cfg_dict, num_classes, channels, i, int(cpus_per_worker)) for i in range(workers)]


class WorkerDied(RuntimeError):
    """A worker actor (or its process) died; the coordinator replaces it and resumes from the markers."""


def get(refs, timeout: float | None = None):
    try:
        return ray.get(refs, timeout=timeout)
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
        raise WorkerDied(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc


def kill(actor) -> None:
    if actor is not None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - it may already be gone, which is what we want
            log.debug("kill worker: %s", exc)


def shutdown(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()
