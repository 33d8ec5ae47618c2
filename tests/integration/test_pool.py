"""The worker pool on a real local Ray with a real gloo process group: two CPU workers over real MNIST shards.

What data parallelism must guarantee: after a training stage every worker holds the same surrogate; a shard's noise
does not depend on which worker computes it (so an idle worker may take another's shard); class-wise updates are
summed over the pool so every worker holds the same class noise.
"""

from __future__ import annotations

import io
import os

import pytest
import ray
import torch

from pipeline import pool
from pipeline.config import ProtectConfig
from pipeline.plan import build_plan
from pipeline.schedule import assign_shards


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _pool(corpus: dict, mode: str, workers: int = 2):
    train = os.path.join(corpus["root"], "train")
    cfg = ProtectConfig(inputs=[train], output="/unused", mode=mode, resolution=28, pgd_steps=2, step_size="2/255",
                        train_steps=3, batch_size=64, skip_converged=False).resolved()
    plan = build_plan(cfg.inputs, None, None, "cls")
    cfg.num_classes = plan.num_classes
    actors = pool.start_workers(cfg.to_dict(), plan.num_classes, plan.channels, workers, 0, 1)
    shares = assign_shards(plan.shards, workers)
    pool.get_all([w.load_shards.remote([(s.id, s.url) for s in share]) for w, share in zip(actors, shares)])
    return actors, shares, plan


def _weights(worker) -> dict:
    state = torch.load(io.BytesIO(pool.get(worker.checkpoint.remote())), weights_only=True)
    return state["model"]


def test_after_data_parallel_training_every_worker_holds_the_same_surrogate(local_ray, mnist_small):
    actors, shares, _ = _pool(mnist_small, "samplewise")
    try:
        assert [len(s) for s in shares] == [2, 1]
        before = _weights(actors[0])
        results = pool.get_all([w.train_stage.remote(0) for w in actors])
        assert all(r["loss"] > 0 for r in results)
        a, b = _weights(actors[0]), _weights(actors[1])
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{k} differs between the workers after the training stage"
        assert any(not torch.equal(a[k], before[k]) for k in a)  # it trained
        # A shard's noise does not depend on which worker computes it: worker 1 as a guest == worker 0 as owner.
        shard = shares[0][0]
        own = pool.get(actors[0].noise_stage.remote(shard.id, 0))
        guest = pool.get(actors[1].noise_stage_guest.remote(shard.id, 0, shard.url, None))
        assert guest["guest"] and own["samples"] == guest["samples"] == shard.samples
        assert pool.get(actors[0].noise_state.remote(shard.id)) == pool.get(actors[1].noise_state.remote(shard.id))
        # The guest shard is not the guest's: its stop check still counts only its own samples.
        errors = pool.get_all([w.released_error.remote() for w in actors])
        assert [e["total"] for e in errors] == [sum(s.samples for s in share) for share in shares]
    finally:
        for w in actors:
            pool.kill(w)


def test_classwise_updates_are_summed_over_the_pool(local_ray, mnist_small):
    actors, shares, plan = _pool(mnist_small, "classwise")
    try:
        pool.get_all([w.train_stage.remote(0) for w in actors])
        for w, share in zip(actors, shares):
            pool.get_all([w.noise_stage.remote(s.id, 0) for s in share])
        parts = pool.get_all([w.class_update_sums.remote() for w in actors])
        counts = sum(p[1] for p in parts)
        assert int(counts.sum()) == plan.total_samples  # every sample of the corpus, from both workers
        assert all(int(p[1].sum()) > 0 for p in parts)
        pool.get_all([w.apply_class_update.remote(sum(p[0] for p in parts), counts) for w in actors])
        states = pool.get_all([w.noise_state.remote(None) for w in actors])
        assert states[0] == states[1]
        q = torch.load(io.BytesIO(states[0]), weights_only=True)["q"]
        assert q.abs().max() > 0 and q.shape[0] == plan.num_classes
    finally:
        for w in actors:
            pool.kill(w)
