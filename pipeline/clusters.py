"""``--labels cluster``: pseudo-labels for an unlabelled corpus, from k-means on the images' pixels.

Error-minimizing noise needs a label per sample: the surrogate learns it and the noise makes it trivially easy. Without
labels, the corpus is grouped into ``--num-classes`` clusters and the cluster is the label (in the spirit of
"unlearnable clusters", Zhang et al., CVPR 2023, which clusters a pretrained model's features). Pixel clusters agree
with the classes too weakly for that noise to protect against a victim who has the true labels (measured on MNIST-5k:
94% against 97% clean), and the probe, which learns the clusters, cannot see it: such a run is never reported
protected (``pipeline.outcome.UNCERTIFIED_CLUSTERS``).

Features: the clean working image, average-pooled to at most ``FEATURE_SIDE`` px, centred and scaled to unit norm per
image (so brightness and contrast do not make the groups). Distributed k-means, the same on any pool size:

- seeding: every worker offers its ``candidates`` samples of smallest key hash; the coordinator keeps the globally
  smallest and runs k-means++ on them with the run's seed (the same candidates whatever worker holds them);
- Lloyd iterations: every worker sums its samples' features per nearest centroid in float64; the coordinator adds the
  sums and moves the centroids; an empty cluster keeps its centroid.

The centroids are committed in the work dir (``clusters.pt`` and its marker): a resumed run assigns the same labels.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import torch
import torch.nn.functional as F

FEATURE_SIDE = 16
# k-means++ seeds from the globally first samples in key-hash order: this many per cluster, at least MIN_CANDIDATES.
CANDIDATES_PER_CLUSTER = 50
MIN_CANDIDATES = 1000
MAX_ITERATIONS = 30
# Centroids that moved less than this (in feature units: features have norm 1) are settled.
TOLERANCE = 1e-6


def features(x: torch.Tensor) -> torch.Tensor:
    """N x C x R x R uint8 working images -> N x D float32 clustering features (unit norm, centred per image)."""
    if x.shape[0] == 0:
        side = min(x.shape[-1], FEATURE_SIDE)
        return torch.empty(0, x.shape[1] * side * side)
    f = x.to(torch.float32) / 255.0
    if f.shape[-1] > FEATURE_SIDE:
        f = F.adaptive_avg_pool2d(f, FEATURE_SIDE)
    f = f.flatten(1)
    f = f - f.mean(1, keepdim=True)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-6)


def key_rank(key: str, seed: int) -> str:
    """A sample's place in the seeding order: a hash of its key (the same on any worker)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def nearest(feats: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean; ties to the lower index) of every row of ``feats``."""
    out = torch.empty(feats.shape[0], dtype=torch.long)
    c = centroids.to(torch.float32)
    c_sq = (c * c).sum(1)
    for start in range(0, feats.shape[0], chunk):
        part = feats[start : start + chunk].to(torch.float32)
        d = c_sq[None, :] - 2 * part @ c.T  # |x|^2 is the same for every centroid
        out[start : start + chunk] = d.argmin(1)
    return out


def sums(feats: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-centroid float64 sums of the rows nearest to it, and their counts (one worker's share of a Lloyd step)."""
    k = centroids.shape[0]
    idx = nearest(feats, centroids)
    total = torch.zeros(k, feats.shape[1], dtype=torch.float64)
    total.index_add_(0, idx, feats.to(torch.float64))
    return total, torch.bincount(idx, minlength=k).to(torch.float64)


def seed_centroids(candidates: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++ on the candidate features (rows in seeding order), with the run's seed."""
    if candidates.shape[0] < k:
        raise ValueError(
            f"--labels cluster: {candidates.shape[0]} samples cannot form {k} clusters (lower --num-classes)"
        )
    g = torch.Generator().manual_seed(seed)
    cand = candidates.to(torch.float64)
    chosen = [int(torch.randint(cand.shape[0], (1,), generator=g))]
    d2 = ((cand - cand[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:  # fewer distinct images than clusters: take the next unused ones
            nxt = next(i for i in range(cand.shape[0]) if i not in chosen)
        else:
            nxt = int(torch.multinomial(d2, 1, generator=g))
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((cand - cand[nxt]) ** 2).sum(1))
    return cand[chosen].clone()


def lloyd_update(centroids: torch.Tensor, total: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """New centroids from the pool's summed ``total`` and ``counts`` (an empty cluster keeps its centroid), and how
    far the farthest moved."""
    moved = torch.where(counts[:, None] > 0, total / counts.clamp_min(1)[:, None], centroids.to(torch.float64))
    return moved, float((moved - centroids.to(torch.float64)).norm(dim=1).max())


def kmeans(
    offer: Callable[[int], list[list[tuple[str, torch.Tensor]]]],
    step: Callable[[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]],
    k: int,
    seed: int,
) -> tuple[torch.Tensor, int]:
    """k-means over a pool: ``offer(m)`` returns every worker's ``m`` seeding candidates (``cluster_candidates``),
    ``step(centroids)`` every worker's Lloyd sums (``cluster_sums``). Returns the centroids and the iterations."""
    m = max(CANDIDATES_PER_CLUSTER * k, MIN_CANDIDATES)
    ranked = sorted((pair for part in offer(m) for pair in part), key=lambda pair: pair[0])[:m]
    if not ranked:
        raise ValueError("--labels cluster: no sample to cluster")
    centroids = seed_centroids(torch.stack([f for _, f in ranked]), k, seed)
    for iteration in range(1, MAX_ITERATIONS + 1):
        parts = step(centroids)
        total = sum(p[0] for p in parts)
        counts = sum(p[1] for p in parts)
        centroids, moved = lloyd_update(centroids, total, counts)
        if moved < TOLERANCE:
            break
    return centroids, iteration


def to_bytes(centroids: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save({"centroids": centroids.to(torch.float64).contiguous()}, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["centroids"]
