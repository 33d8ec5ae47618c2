"""The in-process executor: the Ray pool's calls (``start_workers``, ``put``, ``get``, ``get_all``, ``wait``,
``next_of``, ``kill``) over one ``RoundWorker`` in this process, so that ``bench`` and the benchmark scripts run the
coordinator's own stages without Ray. A call runs when it is made; its result (or its exception) waits in a ``Ref``
until ``get``. One worker only: a pool of several trains data-parallel in a process group, one process per worker.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.worker import RoundWorker


class Ref:
    """A finished call's result, or the exception it raised (raised again by ``get``)."""

    __slots__ = ("error", "value")

    def __init__(self, value=None, error: BaseException | None = None):
        self.value, self.error = value, error


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs) -> Ref:
        args = [get(a) if isinstance(a, Ref) else a for a in args]
        kwargs = {k: get(v) if isinstance(v, Ref) else v for k, v in kwargs.items()}
        try:
            return Ref(self.fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to the caller's get(), as Ray hands a task's error
            return Ref(error=exc)


class LocalActor:
    """A worker called as a Ray actor is: ``actor.method.remote(...)``; ``worker`` is the object itself."""

    def __init__(self, worker: RoundWorker):
        self.worker = worker

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.worker, name))


def start_workers(
    cfg_dict: dict, num_classes: int, channels: int, workers: int, gpus_per_worker: float, cpus_per_worker: float | None
) -> list[LocalActor]:
    if workers != 1:
        raise ValueError(f"the in-process executor runs one worker, not {workers}")
    worker = RoundWorker(cfg_dict, num_classes, channels, 0, threads=int(cpus_per_worker) if cpus_per_worker else None)
    worker.init_distributed(0, 1, "127.0.0.1", 0, None)
    return [LocalActor(worker)]


def pool_size(
    workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float | None
) -> tuple[int, float, float | None]:
    return workers or 1, gpus_per_worker or 0, cpus_per_worker


def put(value) -> Ref:
    return Ref(value)


def get(refs, timeout: float | None = None):
    if isinstance(refs, list):
        return [get(r) for r in refs]
    if refs.error is not None:
        raise refs.error
    return refs.value


def get_all(refs: list) -> list:
    return [get(r) for r in refs]


def wait(refs: list, timeout: float | None = None) -> tuple[list, list]:
    """Every call has finished when it returns: the first is ready (as ``ray.wait`` with one return)."""
    return refs[:1], refs[1:]


def next_of(stream: Ref):
    """The next item of a call that returned an iterator (``load_shards_streamed``), or None at its end."""
    items: Iterator = get(stream)
    return next(items, None)


def kill(actor) -> None:
    """Nothing to stop: the worker goes with its last reference."""
