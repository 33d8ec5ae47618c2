"""Shards shared out to a pool by sample count, and the noise stage's queue: own shards first, then steal."""

from __future__ import annotations

from pipeline.plan import ShardPlan
from pipeline.schedule import NoiseQueue, assign_shards


def _shards(*sizes: int) -> list[ShardPlan]:
    return [ShardPlan(f"s{i}", f"/d/s{i}.tar", n) for i, n in enumerate(sizes)]


def test_shards_are_shared_out_by_samples_and_keep_the_plan_order():
    shares = assign_shards(_shards(100, 100, 100, 10, 300), 2)
    loads = [sum(s.samples for s in share) for share in shares]
    assert sorted(loads) == [300, 310]
    assert [s.id for s in shares[0]] == ["s3", "s4"] and [s.id for s in shares[1]] == ["s0", "s1", "s2"]
    assert assign_shards(_shards(5, 5, 5), 2) == assign_shards(_shards(5, 5, 5), 2)  # deterministic


def test_more_workers_than_shards_leaves_some_empty_and_one_worker_gets_all():
    assert [len(s) for s in assign_shards(_shards(1, 1), 3)] == [1, 1, 0]
    assert [s.id for s in assign_shards(_shards(3, 0, 7), 1)[0]] == ["s0", "s1", "s2"]


def test_an_idle_worker_takes_the_last_unstarted_shard_of_the_busiest_worker():
    q = NoiseQueue({0: ["a", "b", "c", "d"], 1: ["e"]})
    assert q.next_for(0) == ("a", 0) and q.next_for(1) == ("e", 1)
    assert q.next_for(1) == ("d", 0)  # worker 1 is done with its own: it steals from the far end of worker 0's
    assert q.next_for(0) == ("b", 0) and q.next_for(1) == ("c", 0)
    assert len(q) == 0 and q.next_for(0) is None and q.next_for(1) is None
