"""Victim evaluation: train a fresh model from scratch on (protected) shards, score it on clean test shards.

This is how protection is measured: the victim never sees the noise state, only the released images, and it is
scored on clean originals it never trained on.
"""

from __future__ import annotations

import json
import logging
import statistics
import time

import torch

from ops.image import to_working
from pipeline.plan import expand_inputs
from pipeline.samples import Accepted, SampleRules, prepare_each
from pipeline.storage.shards import ShardReadError, iter_samples
from surrogates import build
from surrogates.training import accuracy, fit

log = logging.getLogger(__name__)


def load_images(inputs: list[str], resolution: int, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decodable, labelled sample of the shards as uint8 N x C x R x R and labels (others are skipped)."""
    rules = SampleRules(num_classes=None, max_pixels=50_000_000)  # type: ignore[arg-type]
    images, labels = [], []
    for url in expand_inputs(inputs):
        for _, result in prepare_each(iter_samples(url), rules, torch.get_num_threads()):
            if isinstance(result, ShardReadError):
                log.warning("%s: %s", url, result.message)
                continue
            if isinstance(result, Accepted):
                images.append(result.image.color)
                labels.append(result.label)
    if not images:
        raise ValueError(f"no labelled images in {inputs}")
    if channels is None:
        channels = 1 if all(img.shape[0] == 1 for img in images) else 3
    x = torch.stack([to_working(img, resolution, channels) for img in images])
    return x, torch.tensor(labels, dtype=torch.long)


def train_victim(x: torch.Tensor, y: torch.Tensor, *, arch: str, epochs: int, num_classes: int, batch_size: int = 128,
                 lr: float = 0.05, pad: int = 4, flip: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build(arch, num_classes, x.shape[1])
    steps = max(1, epochs * (x.shape[0] // min(batch_size, x.shape[0])))
    return fit(model, x, y, steps=steps, batch_size=batch_size, lr=lr, pad=pad, flip=flip, seed=seed)


def evaluate(train: list[str], test: list[str], *, arch: str = "resnet18", epochs: int = 10, resolution: int = 32,
             batch_size: int = 128, lr: float = 0.05, pad: int = 4, flip: bool = False,
             seeds: list[int] | None = None) -> dict:
    """Victims (one per seed) trained on ``train``, scored on the clean ``test`` shards."""
    t0 = time.perf_counter()
    x_train, y_train = load_images(train, resolution)
    x_test, y_test = load_images(test, resolution, channels=x_train.shape[1])
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    accs = []
    for seed in seeds or [0]:
        model = train_victim(x_train, y_train, arch=arch, epochs=epochs, num_classes=num_classes,
                             batch_size=batch_size, lr=lr, pad=pad, flip=flip, seed=seed)
        accs.append(accuracy(model, x_test, y_test))
        log.info("victim %s seed %d: %.2f%% on clean test images", arch, seed, 100 * accs[-1])
    return {
        "arch": arch,
        "epochs": epochs,
        "seeds": seeds or [0],
        "test_accuracy": accs,
        "mean_accuracy": statistics.fmean(accs),
        "train_samples": int(x_train.shape[0]),
        "test_samples": int(x_test.shape[0]),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def add_evaluate_args(p) -> None:
    """The ``evaluate`` command's arguments (the CLI builds its parser from this)."""
    p.add_argument("--train", action="append", required=True, help="training shards (pattern, tar or folder)")
    p.add_argument("--test", action="append", required=True, help="clean test shards")
    p.add_argument("--arch", default="resnet18", help="victim model")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--pad", type=int, default=4, help="random-crop padding")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (leave off for digits)")
    p.add_argument("--seed", type=int, action="append", default=None, help="victim seed; repeat for several")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def evaluate_cli(args) -> int:
    result = evaluate(args.train, args.test, arch=args.arch, epochs=args.epochs, resolution=args.resolution,
                      batch_size=args.batch_size, lr=args.lr, pad=args.pad, flip=args.flip, seeds=args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'arch':<14}{'seed':>6}{'clean test accuracy':>22}")
        for seed, acc in zip(result["seeds"], result["test_accuracy"]):
            print(f"{result['arch']:<14}{seed:>6}{100 * acc:>21.2f}%")
        print(f"{'mean':<20}{100 * result['mean_accuracy']:>21.2f}%   "
              f"({result['train_samples']} train, {result['test_samples']} test, {result['seconds']} s)")
    return 0
