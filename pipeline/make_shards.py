"""``make-shards``: an image folder with one sub-folder per class into WebDataset shards with ``cls`` labels.

Classes are numbered by the sorted sub-folder names; ``classes.json`` beside the shards records the mapping.
Files keep their bytes and extension (a ``.jpg`` stays ``<key>.jpg``); files that are not images go in as they are
and are rejected, with their reason, when protected.
"""

from __future__ import annotations

import json
import os

from pipeline.storage import fs
from pipeline.storage.shards import RawSample, write_tar

EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpeg", ".webp": "webp"}


def make_shards(src_dir: str, out: str, per_shard: int = 1000, prefix: str = "shard") -> dict:
    if per_shard < 1:
        raise ValueError("--per-shard must be at least 1")
    classes = sorted(d for d in os.listdir(src_dir) if os.path.isdir(os.path.join(src_dir, d)))
    if not classes:
        raise ValueError(f"{src_dir} has no class sub-folders")
    samples: list[RawSample] = []
    keys: set[str] = set()
    for label, name in enumerate(classes):
        folder = os.path.join(src_dir, name)
        for fname in sorted(os.listdir(folder)):
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                continue
            stem, ext = os.path.splitext(fname)
            member = EXTENSIONS.get(ext.lower(), ext.lower().lstrip(".") or "bin")
            with open(path, "rb") as f:
                data = f.read()
            key = f"{name}_{stem}".replace(".", "_").replace("/", "_")
            # Two files may map to one key (x.png and x.jpg, a.b.png and a_b.png): keep them separate samples.
            base, n = key, 1
            while key in keys:
                n += 1
                key = f"{base}_{n}"
            keys.add(key)
            samples.append(RawSample(key, {member: data, "cls": str(label).encode()}))
    shards = []
    for i in range(0, len(samples), per_shard):
        url = fs.join(out, f"{prefix}-{i // per_shard:06d}.tar")
        fs.write_verified(url, write_tar(samples[i : i + per_shard]))
        shards.append(url)
    fs.write_bytes(fs.join(out, "classes.json"), json.dumps(dict(enumerate(classes)), indent=2).encode())
    return {"shards": shards, "samples": len(samples), "classes": len(classes)}
