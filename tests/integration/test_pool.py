"""The worker pool on a real local Ray with a real gloo process group: two CPU workers over real MNIST shards.

What data parallelism must guarantee: a training stage on a pool is one worker's training stage (the same global
batches, batch norm over the whole batch), and after it every worker holds the same surrogate; a shard's noise does
not depend on which worker computes it (so an idle worker may take another's shard); class-wise updates are summed
over the pool so every worker holds the same class noise.
"""

from __future__ import annotations

import io
import os

import pytest
import ray
import torch

from pipeline.config import ProtectConfig
from pipeline.executor import ray_pool as pool
from pipeline.plan import build_plan
from pipeline.schedule import assign_shards
from pipeline.worker import RoundWorker


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(corpus: dict, **kw) -> tuple[ProtectConfig, object]:
    train = os.path.join(corpus["root"], "train")
    cfg = ProtectConfig(inputs=[train], output="/unused", **kw).resolved()
    plan = build_plan(cfg.inputs, None, None, "cls")
    cfg.num_classes = plan.num_classes
    return cfg, plan


def _offsets(plan) -> tuple[dict, int]:
    """Every shard's first row in the whole corpus (plan order; these corpora reject nothing), and the total."""
    offsets, total = {}, 0
    for s in plan.shards:
        offsets[s.id] = total
        total += s.samples
    return offsets, total


def _pool(corpus: dict, mode: str, workers: int = 2, **kw):
    settings = {
        "mode": mode,
        "resolution": 28,
        "pgd_steps": 2,
        "step_size": "2/255",
        "train_steps": 3,
        "batch_size": 64,
        "skip_converged": False,
    }
    cfg, plan = _config(corpus, **{**settings, **kw})
    actors = pool.start_workers(cfg.to_dict(), plan.num_classes, plan.channels, workers, 0, 1)
    shares = assign_shards(plan.shards, workers)
    pool.get_all([w.load_shards.remote([(s.id, s.url) for s in share]) for w, share in zip(actors, shares)])
    pool.get_all([w.set_global_rows.remote(*_offsets(plan)) for w in actors])
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


def test_a_training_stage_on_a_pool_of_two_is_one_workers_stage(local_ray, mnist_small):
    """Same weights, same global batches (protect's defaults: 10 steps of 512, here the whole 300-digit corpus in
    a random order each step): the pool's weights equal one worker's up to float32 summation order.

    The tolerance: the weights' distance from one worker's at most 1% of the distance the stage moved them (L2 over
    every float tensor). The pool sums the same terms as one worker in another order (partial sums per worker, then
    the all-reduce); one worker fed the same batches with their rows reversed, nothing but another order, ends
    0.04% of the movement from itself, the pool 0.07% (measured on this corpus). Before batch norm was pooled, two
    workers with per-worker statistics, on these very batches, ended 8.4% away: the shards are sorted by class
    (worker 0 holds digits 0-3 and 6-9, worker 1 holds 3-6), the case where per-worker statistics go wrong."""
    settings = {"resolution": 28, "train_steps": 10, "batch_size": 512}
    cfg, plan = _config(mnist_small, **settings)
    one = RoundWorker(cfg.to_dict(), plan.num_classes, plan.channels, 0, 1)
    one.load_shards([(s.id, s.url) for s in plan.shards])
    one.set_global_rows(*_offsets(plan))
    start = {k: v.clone() for k, v in one.model.state_dict().items()}
    one.train_stage(0)
    alone = one.model.state_dict()
    actors, shares, _ = _pool(mnist_small, "samplewise", **settings)
    try:
        assert [[s.id for s in share] for share in shares] != [[s.id for s in plan.shards], []]
        before = _weights(actors[1])
        assert all(torch.equal(before[k], start[k]) for k in start)  # the same starting weights
        losses = pool.get_all([w.train_stage.remote(0) for w in actors])
        assert losses[0]["loss"] == losses[1]["loss"]  # the pool's mean loss, the same on every worker
        pooled = _weights(actors[1])
        assert pooled.keys() == alone.keys()
        floats = [k for k, v in alone.items() if v.is_floating_point()]
        for k in alone.keys() - floats:  # the step counters
            assert torch.equal(pooled[k], alone[k]), k
        assert all(not torch.equal(alone[k], start[k]) for k in floats)  # every tensor trained
        moved = torch.cat([(alone[k] - start[k]).reshape(-1) for k in floats]).norm()
        apart = torch.cat([(pooled[k] - alone[k]).reshape(-1) for k in floats]).norm()
        assert apart <= 0.01 * moved, f"the pool ended {apart:.3g} from one worker, which moved {moved:.3g}"
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


def test_a_pool_of_two_releases_the_same_bytes_with_every_cache_mode(local_ray, mnist_small, tmp_path):
    """Two workers, working resolution 24 on 28-px digits (so the stop check needs the images at native size): a
    round's training, noise, stop check and export with the natives kept in memory, in the workers' disk files, or
    decoded from the input again (and with disk and none, the working images and noise in the workers' rows files).
    The stop check's count and every released byte are the same in the three modes."""
    seen = {}
    for cache in ("memory", "disk", "none"):
        actors, shares, plan = _pool(mnist_small, "samplewise", resolution=24, cache=cache)
        try:
            pool.get_all([w.train_stage.remote(0) for w in actors])
            for w, share in zip(actors, shares):
                pool.get_all([w.noise_stage.remote(s.id, 0) for s in share])
            check = [pool.get(w.released_error.remote()) for w in actors]
            # What the stop check scored: each shard's released images at the working resolution.
            checked = {
                s.id: pool.get(w.released_working.remote(s.id)) for w, share in zip(actors, shares) for s in share
            }
            out = tmp_path / cache
            for w, share in zip(actors, shares):
                pool.get_all(
                    [w.export_shard.remote(s.id, str(out), str(tmp_path / f"{cache}.work"), "0" * 64) for s in share]
                )
        finally:
            for w in actors:
                pool.kill(w)
        assert sum(c["total"] for c in check) == plan.total_samples and all(c["total"] for c in check)
        files = sorted(p.name for p in out.iterdir())
        assert files == sorted(f"{s.id}{ext}" for s in plan.shards for ext in (".tar", ".parquet", "_stats.json"))
        seen[cache] = (
            [c["wrong"] for c in check],
            {n: (out / n).read_bytes() for n in files if n[-5:] != ".json"},
            checked,
        )
        reference = seen.get("memory", (None, None, checked))[2]
        assert all(torch.equal(checked[s], reference[s]) for s in reference), cache
    for cache in ("disk", "none"):
        assert seen[cache][:2] == seen["memory"][:2], cache


def test_the_plan_read_by_ray_tasks_is_the_plan_read_here_and_records_every_shard(local_ray, mnist_small, tmp_path):
    """``protect`` reads a large corpus for its plan as Ray tasks (``PlanReader``; here from one shard on): the same
    plan, each shard's record written by its task; a task's error reaches the caller as itself, not wrapped."""
    train = os.path.join(mnist_small["root"], "train")
    here = build_plan([train], None, None, "cls", record_dir=str(tmp_path / "here"))
    reader = pool.PlanReader(None, from_shards=1)
    tasks = build_plan([train], None, None, "cls", record_dir=str(tmp_path / "tasks"), reader=reader)
    assert tasks == here and tasks.digest == here.digest and reader.started is False  # Ray was already up
    names = sorted(os.listdir(tmp_path / "tasks"))
    assert names == sorted(f"{s.id}.json" for s in here.shards) == sorted(os.listdir(tmp_path / "here"))
    for name in names:
        assert (tmp_path / "tasks" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OSError) as raised:
        build_plan([train], None, None, "cls", record_dir=str(tmp_path / "a-file" / "records"), reader=reader)
    assert not isinstance(raised.value, ray.exceptions.RayTaskError), type(raised.value)
