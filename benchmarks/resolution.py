"""The working resolution for photos: noise made at several ``--resolution`` values on real photos at their native
size, victims trained at two resolutions.

    python benchmarks/resolution.py --resolutions 32,64,128 --victim-resolutions 32,64 --out /tmp/resolution

Data (nothing is downloaded at run time; Debian's ``plasma-workspace-wallpapers`` is installed with apt-get where
the script may): 10 real camera photos from ``/usr/share/wallpapers``, the photo as the class; ``--per-class`` train
and a quarter of that test crops per photo, square crops (a sixth to a half of the shorter side) resized to
``--native`` px and stored as JPEG: each sample is a photo crop at ``--native`` px, the size the noise is released at.

For each ``--resolutions`` value the train shards are protected (in-process ``protect`` on a real local Ray, the
``--mode`` given, the probe plain), then victims train from scratch on the clean and on each protected release at
every ``--victim-resolutions`` value (``evaluate --resolution``: the released photos resized to it) and are scored on
the clean test crops. Prints a markdown table (the figures the README's photo advice quotes) and writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.efficacy import wallpaper_photos
from pipeline.config import ProtectConfig
from pipeline.coordinator import protect
from pipeline.evaluate import evaluate
from pipeline.storage import fs
from pipeline.storage.shards import RawSample, write_tar
from tools.demo import DEMO_SETTINGS


def build(data: str, per_class: int, native: int) -> None:
    if fs.exists(os.path.join(data, "test", "test-000000.tar")):
        return
    rng = np.random.default_rng(0)
    splits: dict[str, list[RawSample]] = {"train": [], "test": []}
    for label, path in enumerate(wallpaper_photos()):
        img = Image.open(path).convert("RGB")
        side = min(img.size)
        for i in range(per_class + per_class // 4):
            size = int(rng.integers(side // 6, side // 2))
            left, top = int(rng.integers(0, img.width - size)), int(rng.integers(0, img.height - size))
            crop = img.crop((left, top, left + size, top + size)).resize((native, native), Image.LANCZOS)
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=92)
            split = "train" if i < per_class else "test"
            splits[split].append(RawSample(f"p{label}-{i:05d}", {"jpg": buf.getvalue(), "cls": str(label).encode()}))
    for split, samples in splits.items():
        order = rng.permutation(len(samples))
        samples = [samples[i] for i in order]
        for n, start in enumerate(range(0, len(samples), 250)):
            fs.write_verified(
                os.path.join(data, split, f"{split}-{n:06d}.tar"), write_tar(samples[start : start + 250])
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default="32,64,128", help="protect --resolution values")
    p.add_argument("--victim-resolutions", default="32,64", help="evaluate --resolution values")
    p.add_argument("--native", type=int, default=256, help="the photo crops' size in px")
    p.add_argument("--per-class", type=int, default=100, help="train crops per photo (test: a quarter)")
    p.add_argument("--mode", choices=("samplewise", "classwise"), default="classwise")
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="protect --batch-size (default: the demo's)")
    p.add_argument("--train-steps", type=int, default=None, help="protect --train-steps (default: the demo's)")
    p.add_argument(
        "--probe-arch", default="small-cnn", help="protect --probe-arch (resnet-mini costs much more at 128 px)"
    )
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--arch", default="small-cnn", help="the victims' architecture")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--out", default="/tmp/resolution")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = os.path.join(args.out, "data")
    build(data, args.per_class, args.native)
    train, test = [os.path.join(data, "train")], [os.path.join(data, "test")]
    seeds = [int(s) for s in args.seeds.split(",")]
    victim_res = [int(r) for r in args.victim_resolutions.split(",")]
    results: dict = {"native": args.native, "mode": args.mode, "releases": {}, "victims": {}}
    sources = {"clean": train}
    for res in (int(r) for r in args.resolutions.split(",")):
        release = os.path.join(args.out, f"release-{args.mode}-{res}")
        settings = {
            **DEMO_SETTINGS[args.mode],
            "resolution": res,
            "probe_arch": args.probe_arch,
            "probe_steps": args.probe_steps,
        }
        for name in ("max_rounds", "batch_size", "train_steps"):
            if getattr(args, name):
                settings[name] = getattr(args, name)
        t0 = time.perf_counter()
        if fs.exists(os.path.join(release, "_SUCCESS.json")):  # a finished release: reused (delete it to redo)
            success = json.loads(fs.read_bytes(os.path.join(release, "_SUCCESS.json")))
        else:
            cfg = ProtectConfig(
                inputs=train,
                output=release,
                probe_countermeasures="none",
                mode=args.mode,
                cpus_per_worker=args.cpus_per_worker,
                **settings,
            )
            success = protect(cfg).success
        results["releases"][res] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "rounds": success["rounds"],
            "stop_reason": success["stop_reason"],
            "timings": success.get("timings"),
            "probe_accuracy": success["protection"]["probe_accuracy"],
        }
        print(json.dumps({res: results["releases"][res]}), flush=True)
        sources[f"noise at {res} px"] = [release]
    for name, source in sources.items():
        for vr in victim_res:
            v = evaluate(source, test, arch=args.arch, epochs=args.epochs, resolution=vr, pad=vr // 8, seeds=seeds)
            results["victims"][f"{name} / victim at {vr} px"] = v
            print(
                f"{name} / victim at {vr} px: {100 * v['mean_accuracy']:.1f}% "
                f"(early-stopped {100 * v['worst_case']['accuracy']:.1f}% worst)",
                flush=True,
            )
            with open(os.path.join(args.out, "resolution.json"), "w") as f:
                json.dump(results, f, indent=1)
    rows = [
        "| training data | " + " | ".join(f"victim at {vr} px" for vr in victim_res) + " |",
        "|---" * (len(victim_res) + 1) + "|",
    ]
    for name in sources:
        cells = []
        for vr in victim_res:
            v = results["victims"][f"{name} / victim at {vr} px"]
            cells.append(f"{100 * v['mean_accuracy']:.1f}% (worst {100 * v['worst_case']['accuracy']:.1f}%)")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
