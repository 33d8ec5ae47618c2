"""The worker's round code in-process (no Ray), on real MNIST shards: the stages change what they should."""

from __future__ import annotations

import os

import torch

from pipeline.config import ProtectConfig
from pipeline.worker import RoundWorker


def _worker(mnist_small, mode: str) -> tuple[RoundWorker, list[str]]:
    train = os.path.join(mnist_small["root"], "train")
    cfg = ProtectConfig(inputs=[train], output="/unused", mode=mode, surrogate="gap-cnn", resolution=28, pgd_steps=2,
                        step_size="4/255", train_steps=2, batch_size=64, num_classes=10)
    cfg.resolved()
    worker = RoundWorker(cfg.to_dict(), 10, 1, threads=1)
    shards = sorted(n[:-4] for n in os.listdir(train) if n.endswith(".tar"))
    for shard in shards:
        worker.load_shard(shard, os.path.join(train, f"{shard}.tar"))
    return worker, shards


def test_classwise_round_moves_the_class_noise_and_the_release(mnist_small):
    worker, shards = _worker(mnist_small, "classwise")
    worker.train_stage()
    for shard in shards:
        worker.noise_stage(shard, 0)
    sums, counts = worker.class_update_sums()
    # The sums handed to the coordinator are the stage's, not the reset accumulators (same tensor on a CPU worker).
    assert counts.sum() == worker.x.shape[0] and sums.abs().sum() > 0
    assert worker.class_update_sums()[1].sum() == 0  # reset for the next stage
    worker.apply_class_update(sums, counts)
    assert worker.class_delta.abs().max() > 0
    released = worker.released_working(shards[0]).to(torch.int32)
    sd = worker.shards[shards[0]]
    assert (released - worker.x[sd.start : sd.end].to(torch.int32)).abs().sum() > 0


def test_samplewise_noise_stage_moves_background_and_stroke_pixels(mnist_small):
    worker, shards = _worker(mnist_small, "samplewise")
    worker.train_stage()
    worker.noise_stage(shards[0], 0)
    sd = worker.shards[shards[0]]
    x, d = worker.x[sd.start : sd.end], worker.delta[sd.start : sd.end]
    assert (d[x == 0] > 0).float().mean() > 0.1 and (d[x == 255] < 0).float().mean() > 0.1
    assert d.abs().max() <= worker.cfg.eps + 1e-6
