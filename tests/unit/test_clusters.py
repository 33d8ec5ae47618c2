"""--labels cluster (pipeline.clusters): k-means pseudo-labels, the same on one worker and on a pool of two, on real
MNIST digits in-process (no Ray); the plan and the config refuse a clustering without --num-classes."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline import clusters
from pipeline.config import ProtectConfig
from pipeline.plan import PlanError, build_plan
from pipeline.worker import RoundWorker


def test_features_are_centred_unit_vectors_blind_to_brightness_and_contrast():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 200, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    f = clusters.features(x)
    assert f.shape == (5, 3 * 16 * 16)
    assert torch.allclose(f.norm(dim=1), torch.ones(5), atol=1e-5) and f.mean(1).abs().max() < 1e-6
    brighter = (x.to(torch.int32) // 2 + 40).to(torch.uint8)  # half the contrast, brighter
    assert torch.allclose(clusters.features(brighter), f, atol=0.02)
    assert clusters.features(torch.zeros(0, 1, 8, 8, dtype=torch.uint8)).shape == (0, 64)


def test_seeding_is_deterministic_and_refuses_more_clusters_than_samples():
    g = torch.Generator().manual_seed(1)
    cand = torch.randn(40, 6, generator=g)
    a, b = clusters.seed_centroids(cand, 5, seed=3), clusters.seed_centroids(cand, 5, seed=3)
    assert torch.equal(a, b) and len({tuple(r.tolist()) for r in a}) == 5
    assert not torch.equal(a, clusters.seed_centroids(cand, 5, seed=4))
    with pytest.raises(ValueError, match="lower --num-classes"):
        clusters.seed_centroids(cand[:3], 5, seed=0)
    # Fewer distinct images than clusters: still k centroids, no error.
    assert clusters.seed_centroids(torch.zeros(10, 6), 4, seed=0).shape == (4, 6)


def _workers(mnist_small, split: list[list[str]]) -> list[RoundWorker]:
    train = os.path.join(mnist_small["root"], "train")
    cfg = ProtectConfig(inputs=[train], output="/unused", resolution=28, num_classes=10, labels="cluster").resolved()
    workers = []
    for index, shards in enumerate(split):
        w = RoundWorker(cfg.to_dict(), 10, 1, index=index, threads=1)
        w.load_shards([(s, os.path.join(train, f"{s}.tar")) for s in shards])
        assert (w.y == -1).all()  # no label read
        workers.append(w)
    return workers


def _cluster(workers: list[RoundWorker]) -> tuple[torch.Tensor, list[int]]:
    centroids, iterations = clusters.kmeans(
        lambda m: [w.cluster_candidates(m) for w in workers], lambda c: [w.cluster_sums(c) for w in workers], 10, seed=0
    )
    assert 1 < iterations <= clusters.MAX_ITERATIONS
    for w in workers:
        w.set_centroids(centroids)
    return centroids, [int(v) for w in workers for v in w.y[: w.n_owned]]


def test_one_worker_and_a_pool_of_two_give_every_digit_the_same_cluster(mnist_small):
    shards = sorted(n[:-4] for n in os.listdir(os.path.join(mnist_small["root"], "train")) if n.endswith(".tar"))
    one = _workers(mnist_small, [shards])
    two = _workers(mnist_small, [[shards[0], shards[2]], [shards[1]]])
    c1, labels1 = _cluster(one)
    c2, _ = _cluster(two)
    assert torch.allclose(c1, c2, atol=1e-9)
    by_key = {k: int(w.y[w.shards[s].start + i]) for w in two for s in w.owned for i, k in enumerate(w.shards[s].keys)}
    assert [by_key[k] for s in one[0].owned for k in one[0].shards[s].keys] == labels1
    # The clusters carry the digits: each cluster's majority digit covers far more than chance (10%) of it.
    digits = _true_digits(mnist_small, one[0])
    purity = sum(
        max(sum(1 for d, c in zip(digits, labels1) if c == k and d == t) for t in range(10)) for k in range(10)
    ) / len(labels1)
    assert purity >= 0.4, purity
    assert len(set(labels1)) == 10
    # A shard loaded later (a guest in the noise stage) gets its labels from the same centroids.
    guest = _workers(mnist_small, [[shards[1]]])[0]
    guest.centroids = c1
    guest.load_shard(shards[0], os.path.join(mnist_small["root"], "train", f"{shards[0]}.tar"))
    sd = guest.shards[shards[0]]
    assert guest.y[sd.start : sd.end].tolist() == labels1[: sd.end - sd.start]


def _true_digits(mnist_small, worker: RoundWorker) -> list[int]:
    import tarfile

    digits = {}
    for name in os.listdir(os.path.join(mnist_small["root"], "train")):
        with tarfile.open(os.path.join(mnist_small["root"], "train", name)) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    digits[m.name[:-4]] = int(tar.extractfile(m).read())
    return [digits[k] for s in worker.owned for k in worker.shards[s].keys]


def test_the_plan_and_the_config_need_num_classes_to_cluster(mnist_small):
    train = os.path.join(mnist_small["root"], "train")
    with pytest.raises(PlanError, match="--labels cluster needs --num-classes"):
        build_plan([train], None, None, "cls", labels="cluster")
    with pytest.raises(ValueError, match="--labels cluster needs --num-classes"):
        ProtectConfig(inputs=[train], output="/o", labels="cluster").resolved()
    with pytest.raises(ValueError, match="--labels must be"):
        ProtectConfig(inputs=[train], output="/o", labels="kmeans").resolved()
    plan = build_plan([train], 7, None, "no-such-member", labels="cluster")  # labels are not read at all
    assert plan.num_classes == 7 and plan.label_names == ()
