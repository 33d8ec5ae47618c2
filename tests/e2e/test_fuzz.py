"""Seeded fuzz: small random corpora that mix real digits with hostile keys, members, labels and images.

Whatever the mix, a run ends 0, 2, 3 or 4 with its reason in one last line on stderr and no traceback; every input
sample ends in exactly one manifest row; and no released member decodes to the pixels of any original.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import raw_tar, run_cli
from PIL import Image

ARGS = [
    "--resolution",
    "16",
    "--pgd-steps",
    "2",
    "--step-size",
    "2/255",
    "--train-steps",
    "2",
    "--batch-size",
    "32",
    "--probe-steps",
    "10",
    "--probe-arch",
    "small-cnn",
    "--probe-countermeasures",
    "none",
    "--max-rounds",
    "1",
    "--stop-error",
    "1.0",
]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _textured(rng: random.Random, mode: str) -> Image.Image:
    """Random pixels in 30..225: noise of 8 levels always changes some of them (no clipping at 0 or 255)."""
    h, w = rng.randint(8, 40), rng.randint(8, 40)
    shape = (h, w) if mode == "L" else (h, w, 3)
    return Image.fromarray(np.random.default_rng(rng.randrange(2**32)).integers(30, 226, shape, dtype=np.uint8), mode)


def _sample(rng: random.Random, i: int, digits: list[tuple[bytes, bytes]]) -> list[tuple[str, bytes]]:
    """The members of one random sample (name, bytes): good most of the time, hostile otherwise."""
    key = f"s{i:03d}"
    kind = rng.choice(
        ["digit"] * 6
        + [
            "photo",
            "jpeg",
            "traversal",
            "absolute",
            "not-utf8",
            "copy",
            "label",
            "nolabel",
            "noimage",
            "undecodable",
            "repeat",
            "nested",
        ]
    )
    png, cls = digits[i % len(digits)]
    if kind == "digit":
        return [(f"{key}.png", png), (f"{key}.cls", cls), (f"{key}.txt", b"caption")]
    if kind == "photo":
        return [(f"{key}.png", _encode(_textured(rng, rng.choice(["L", "RGB"])), "PNG")), (f"{key}.cls", cls)]
    if kind == "jpeg":
        return [(f"{key}.jpg", _encode(_textured(rng, "RGB"), "JPEG")), (f"{key}.cls", cls)]
    if kind == "traversal":
        return [(f"../{key}.png", png), (f"../{key}.cls", cls)]
    if kind == "absolute":
        return [(f"/tmp/{key}.png", png), (f"/tmp/{key}.cls", cls)]
    if kind == "not-utf8":
        bad = (key.encode() + b"\xfe").decode("utf-8", "surrogateescape")
        return [(f"{bad}.png", png), (f"{bad}.cls", cls)]
    if kind == "copy":
        fmt, ext = rng.choice([("TIFF", "tif"), ("BMP", "bmp"), ("GIF", "gif"), ("PNG", "jpeg"), ("PNG", "dat")])
        return [(f"{key}.png", png), (f"{key}.{ext}", _encode(Image.open(io.BytesIO(png)), fmt)), (f"{key}.cls", cls)]
    if kind == "label":
        return [
            (f"{key}.png", png),
            (f"{key}.cls", rng.choice([b" 2 \n", b"+2", "３".encode(), b"0_3", b"seven", b"1000000000000", b""])),
        ]
    if kind == "nolabel":
        return [(f"{key}.png", png)]
    if kind == "noimage":
        return [(f"{key}.cls", cls), (f"{key}.json", b"{}")]
    if kind == "undecodable":
        return [(f"{key}.png", png[: len(png) // 3]), (f"{key}.cls", cls)]
    if kind == "repeat":
        return [(f"{key}.png", png), (f"{key}.cls", cls), (f"{key}x.cls", cls), (f"{key}.png", png)]
    return [(f"dir/{key}.png", png), (f"dir/{key}.cls", cls)]  # nested: a folder in the key is fine


def _corpus(root, seed: int, digits) -> tuple[list[str], dict[str, int], list[np.ndarray]]:
    """Two shards of random samples: (shard paths, samples per shard as a reader counts them, original pixels)."""
    rng = random.Random(seed)
    paths, counts, originals = [], {}, []
    for s in range(2):
        members = [m for i in range(s * 40, s * 40 + 40) for m in _sample(rng, i, digits)]
        for _, data in members:
            with contextlib.suppress(Exception):  # not an image
                originals.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")))
        path = root / f"fuzz{seed}-{s}.tar"
        path.write_bytes(raw_tar(members))
        paths.append(str(path))
        # webdataset groups consecutive members by key: each group is one sample, and one manifest row.
        keys = [
            name.rsplit("/", 1)[0] + "/" + name.rsplit("/", 1)[-1].split(".", 1)[0]
            if "/" in name
            else name.split(".", 1)[0]
            for name, _ in members
        ]
        counts[f"fuzz{seed}-{s}"] = sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)
    return paths, counts, originals


@pytest.fixture(scope="module")
def digits(mnist_small) -> list[tuple[bytes, bytes]]:
    path = os.path.join(mnist_small["root"], "train", "train-000000.tar")
    with tarfile.open(path) as tar:
        names = sorted(tar.getnames())
        keys = sorted({n.split(".", 1)[0] for n in names})[:40]
        return [(tar.extractfile(f"{k}.png").read(), tar.extractfile(f"{k}.cls").read()) for k in keys]


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_a_random_hostile_corpus_ends_cleanly_with_one_row_per_sample_and_nothing_unprotected(
    seed, digits, tmp_path, ray_cluster
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    paths, counts, originals = _corpus(corpus, seed, digits)
    out = str(tmp_path / "release")
    proc = run_cli("protect", "--input", str(corpus), "--output", out, *ARGS, ray_address=ray_cluster)
    assert proc.returncode in (0, 2, 3, 4), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if proc.returncode:
        assert proc.stderr.strip().splitlines()[-1].startswith("unlearnable: "), proc.stderr[-2000:]
    if proc.returncode not in (0, 4):
        return
    rows = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    per_shard = {shard: sum(r["shard"] == shard for r in rows) for shard in counts}
    assert per_shard == counts  # exactly one row per input sample
    with open(os.path.join(out, "_SUCCESS.json")) as f:
        assert json.load(f)["counts"]["input"] == len(rows)
    assert run_cli("verify", out).returncode == 0
    released = 0
    for path in paths:
        name = os.path.basename(path)
        with tarfile.open(os.path.join(out, name)) as tar:
            for member in tar.getmembers():
                assert not member.name.startswith("/") and ".." not in member.name, member.name
                data = tar.extractfile(member).read()
                try:
                    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
                except Exception:  # noqa: BLE001, S112 - a label or caption: whatever does not decode is not an image
                    continue
                assert member.name.endswith(".png"), member.name  # the protected image, nothing else
                released += 1
                assert not any(o.shape == pixels.shape and np.array_equal(o, pixels) for o in originals), member.name
    assert released == sum(r["status"] == "protected" for r in rows) > 0
