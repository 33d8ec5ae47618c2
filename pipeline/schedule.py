"""Who does what in a pool: shards shared out to workers (by sample count), and the noise stage's shard queue.

Each worker owns a fixed share of the corpus (it holds those shards' data, trains on them, checks and exports them),
so the result of a run depends on the seed and the worker count only. The noise stage is the exception that keeps a
slow worker from holding the others back: a worker that has finished its own shards takes one that another worker
has not started yet (a guest), and its result goes back to the owner. Which worker computes a shard's noise does not
change the noise: every worker holds the same surrogate after the data-parallel training stage.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from pipeline.plan import ShardPlan


def assign_shards(shards: Sequence[ShardPlan], workers: int) -> list[list[ShardPlan]]:
    """Share shards out so that every worker holds about as many samples: the largest shard first, each to the
    worker with the fewest samples so far (ties: the lowest index). Each share keeps the plan's order."""
    if workers < 1:
        raise ValueError("a pool needs at least one worker")
    load = [0] * workers
    owner: dict[str, int] = {}
    for shard in sorted(shards, key=lambda s: (-s.samples, s.id)):
        i = min(range(workers), key=lambda w: (load[w], w))
        owner[shard.id] = i
        load[i] += max(shard.samples, 1)
    return [[s for s in shards if owner[s.id] == i] for i in range(workers)]


class NoiseQueue:
    """The shards left in a noise stage, per owner. ``next_for(worker)`` gives a worker its own next shard, or, when
    it has none left, the last unstarted shard of the worker with the most left (taking from the far end of another
    worker's queue keeps out of its way). Returns ``(shard, owner)`` or None when nothing is left to start."""

    def __init__(self, queues: dict[int, Sequence[str]]) -> None:
        self.queues = {w: deque(q) for w, q in queues.items()}

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def next_for(self, worker: int) -> tuple[str, int] | None:
        own = self.queues.get(worker)
        if own:
            return own.popleft(), worker
        victim = max(self.queues, key=lambda w: (len(self.queues[w]), -w), default=None)
        if victim is None or not self.queues[victim]:
            return None
        return self.queues[victim].pop(), victim
