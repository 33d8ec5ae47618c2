"""A worker's peak memory and round speed against the corpus size, in each ``--cache`` mode.

    python benchmarks/memory.py --photos 1000,4000,16000 --caches none,disk,memory --out /tmp/memory

For each corpus size, synthetic 512x384 JPEG photos (smooth random scenes with grain, 500 to a shard, written once
under ``--out``) are protected for one round by the run's own stages on one in-process worker (``coordinator.Run``
on ``pipeline.executor.local``, no Ray: the load, the train stage, the noise stage over every shard with its commits,
the stop check; no probe) at working resolution 32, in a fresh
process per (size, cache mode), so that its peak RSS (``ru_maxrss``) is that run's alone. Prints a markdown table:
peak RSS, the round's seconds and image-steps per second (noise-stage image-steps over the round's wall time,
load excluded), and each mode's figures as ratios against the smallest corpus and against ``memory``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PER_SHARD = 500


def make_corpus(folder: str, photos: int) -> list[tuple[str, str]]:
    from pipeline.storage.shards import RawSample, write_tar

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for s, start in enumerate(range(0, photos, PER_SHARD)):
        path = os.path.join(folder, f"photos-{s:06d}.tar")
        shards.append((f"photos-{s:06d}", path))
        if os.path.exists(path):
            continue
        samples = []
        for i in range(start, min(start + PER_SHARD, photos)):
            scene = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((512, 384), Image.BICUBIC)
            grain = rng.normal(0, 6, (384, 512, 3))
            pixels = np.clip(np.asarray(scene, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            samples.append(RawSample(f"p{i:07d}", {"jpg": buf.getvalue(), "cls": str(i % 10).encode()}))
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(write_tar(samples))
        os.replace(tmp, path)
    return shards


def one_round(folder: str, photos: int, cache: str, pgd_steps: int, threads: int) -> dict:
    """One round of the run's own stages (``coordinator.Run`` on the in-process executor, no Ray, no probe) in this
    process, its work dir in a temp dir; returns its timings and this process's peak RSS."""
    import tempfile

    from pipeline.config import ProtectConfig
    from pipeline.coordinator import Run
    from pipeline.executor import local
    from pipeline.prepare import prepare_run

    shards = make_corpus(folder, photos)
    with tempfile.TemporaryDirectory(prefix="unlearnable-memory-") as tmp:
        cfg = ProtectConfig(
            inputs=[folder],
            output=os.path.join(tmp, "out"),
            resolution=32,
            num_classes=10,
            pgd_steps=pgd_steps,
            train_steps=10,
            batch_size=128,
            cache=cache,
            cpus_per_worker=threads,
            probe_countermeasures="none",
            keep_work=True,
        )
        prepared = prepare_run(cfg)
        run = Run(cfg, prepared.layout, prepared.plan, prepared.chash, executor=local)
        run.start_workers()
        worker = run.workers[0].worker
        load_s = run.timings["load"]
        t0 = time.perf_counter()
        record = run._round(0, None, final=False, probe=False)
        round_s = time.perf_counter() - t0
        check = {"seconds": record["seconds"]["check"]}
    input_bytes = sum(os.path.getsize(path) for _, path in shards)
    cache_bytes = worker.disk_cache.bytes if worker.disk_cache is not None else None
    return {
        "photos": photos,
        "cache": cache,
        "accepted": int(worker.x.shape[0]),
        "load_s": round(load_s, 1),
        "input_bytes_per_photo": round(input_bytes / photos),
        "cache_file_bytes_per_photo": None if cache_bytes is None else round(cache_bytes / photos),
        "round_s": round(round_s, 1),
        "check_s": round(check["seconds"], 1),
        "image_steps_per_s": round(photos * pgd_steps / round_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default="1000,4000,16000")
    p.add_argument("--caches", default="none,disk,memory")
    p.add_argument("--pgd-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/memory")
    p.add_argument("--one", nargs=2, metavar=("PHOTOS", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        photos = int(args.one[0])
        print(
            json.dumps(
                one_round(os.path.join(args.out, f"photos-{photos}"), photos, args.one[1], args.pgd_steps, args.threads)
            )
        )
        return 0
    rows = []
    for photos in (int(n) for n in args.photos.split(",")):
        make_corpus(os.path.join(args.out, f"photos-{photos}"), photos)
        for cache in args.caches.split(","):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(photos),
                    cache,
                    "--out",
                    args.out,
                    "--pgd-steps",
                    str(args.pgd_steps),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(rows, f, indent=1)
    first = {r["cache"]: r for r in rows if r["photos"] == rows[0]["photos"]}
    memory = {r["photos"]: r for r in rows if r["cache"] == "memory"}
    print("| photos | --cache | peak RSS | vs smallest corpus | round | image-steps/s | vs memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = first[r["cache"]]["peak_rss_mb"]
        m = memory.get(r["photos"])
        print(
            f"| {r['photos']:,} | {r['cache']} | {r['peak_rss_mb']:,} MB | {r['peak_rss_mb'] / base:.2f}x | "
            f"{r['round_s']} s | {r['image_steps_per_s']} | "
            + (f"{r['image_steps_per_s'] / m['image_steps_per_s']:.2f}x |" if m else "- |")
        )
    # What a round reads in each mode, for a million such photos, from the bytes per photo measured above: memory
    # reads nothing (the natives stay decoded: their RAM is the cost), disk reads its raw file from local disk, none
    # reads the input's encoded bytes from wherever the input lives (and decodes them again).
    per_input = max(r["input_bytes_per_photo"] for r in rows)
    raw = [r["cache_file_bytes_per_photo"] for r in rows if r["cache_file_bytes_per_photo"]]
    print(
        f"\nI/O per round for 1,000,000 such photos (input {per_input:,} B a photo"
        + (f", decoded {raw[0]:,} B" if raw else "")
        + "):"
    )
    print(
        f"memory: none (the decoded natives held in RAM instead: {raw[0] * 1e6 / 1e9:,.0f} GB over the pool)"
        if raw
        else "memory: none"
    )
    if raw:
        print(f"disk: {raw[0] * 1e6 / 1e9:,.0f} GB read from the workers' local disks (written once at load)")
    print(f"none: {per_input * 1e6 / 1e9:,.0f} GB read from the input's storage, decoded again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
