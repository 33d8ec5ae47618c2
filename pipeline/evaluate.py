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

from ops.countermeasures import ALL, SPECS, Countermeasure, adversary, batch_augment, parse_battery, preprocess
from ops.image import to_working
from pipeline.plan import expand_inputs
from pipeline.probe import early_stopping_split
from pipeline.samples import Accepted, SampleRules, prepare_each
from pipeline.storage.shards import ShardReadError, iter_samples
from surrogates import build
from surrogates.training import accuracy, best_class, final_scores, fit_epochs

log = logging.getLogger(__name__)


def load_samples(
    inputs: list[str], resolution: int, channels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every decodable, labelled sample of the shards as uint8 N x C x R x R, labels and keys (others are skipped)."""
    rules = SampleRules(num_classes=None, max_pixels=50_000_000)  # type: ignore[arg-type]
    images, labels, keys = [], [], []
    for url in expand_inputs(inputs):
        for _, result in prepare_each(iter_samples(url), rules, torch.get_num_threads()):
            if isinstance(result, ShardReadError):
                log.warning("%s: %s", url, result.message)
                continue
            if isinstance(result, Accepted):
                images.append(result.image.color)
                labels.append(result.label)
                keys.append(result.key)
    if not images:
        raise ValueError(f"no labelled images in {inputs}")
    if channels is None:
        channels = 1 if all(img.shape[0] == 1 for img in images) else 3
    x = torch.stack([to_working(img, resolution, channels) for img in images])
    return x, torch.tensor(labels, dtype=torch.long), keys


def _mean_by_class(per_seed: list[list[float | None]]) -> list[float | None]:
    return [None if any(a is None for a in col) else statistics.fmean(col) for col in zip(*per_seed)]


def load_images(inputs: list[str], resolution: int, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decodable, labelled sample of the shards as uint8 N x C x R x R and labels (others are skipped)."""
    x, y, _ = load_samples(inputs, resolution, channels)
    return x, y


def train_countered_victim(
    x: torch.Tensor,
    y: torch.Tensor,
    cm: Countermeasure,
    *,
    arch: str,
    epochs: int,
    num_classes: int,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    x_hold: torch.Tensor,
    y_hold: torch.Tensor,
    batch_size: int = 128,
    lr: float = 0.05,
    pad: int = 4,
    flip: bool = False,
    seed: int = 0,
) -> tuple[torch.nn.Module, list[float], list[float]]:
    """A victim trained on ``x`` (already preprocessed) with ``cm``'s training-time change, if any; scored after every
    epoch on the validation half and the held-out half. Returns the model and both per-epoch curves. With ``none``
    it trains the same weights as ``surrogates.training.fit`` over the same steps (tested)."""
    torch.manual_seed(seed)
    model = build(arch, num_classes, x.shape[1])
    val_curve: list[float] = []
    hold_curve: list[float] = []

    def score(epoch: int, m: torch.nn.Module) -> None:
        val_curve.append(accuracy(m, x_val, y_val))
        hold_curve.append(accuracy(m, x_hold, y_hold))
        log.debug(
            "%s %s seed %d epoch %d: validation %.4f, held out %.4f",
            arch,
            cm.text,
            seed,
            epoch,
            val_curve[-1],
            hold_curve[-1],
        )

    fit_epochs(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        pad=pad,
        flip=flip,
        seed=seed,
        augment=batch_augment(cm, num_classes),
        adversary=adversary(cm),
        on_epoch=score,
    )
    return model, val_curve, hold_curve


def evaluate(
    train: list[str],
    test: list[str],
    *,
    arch: str = "resnet18",
    epochs: int = 10,
    resolution: int = 32,
    batch_size: int = 128,
    lr: float = 0.05,
    pad: int = 4,
    flip: bool = False,
    seeds: list[int] | None = None,
    countermeasures: list[str] | None = None,
) -> dict:
    """Victims (one per seed and countermeasure) trained on ``train``, scored on the clean ``test`` shards.

    ``countermeasures`` are ``NAME[:ARG]`` texts (``ops.countermeasures``; default: ``none`` only). A preprocessing
    countermeasure is the victim's input pipeline: it is applied to its training images and to the test images it
    is scored on. Every victim reports its final accuracy (the whole test set, after the last epoch) and its
    early-stopped accuracy (the test set is split in two halves by key hash; after each epoch the victim is scored on
    half A, and the held-out half B's accuracy at the best half-A epoch is reported). ``worst_case`` is the largest
    of the mean final and mean early-stopped accuracies over the battery: what the most informed adversary gets.
    ``test_accuracy``/``mean_accuracy`` are the final accuracies of ``none`` when it is in the battery (else of the
    first countermeasure), as before the battery existed.
    """
    t0 = time.perf_counter()
    battery = parse_battery(countermeasures or ["none"])
    if epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    seeds = list(seeds or [0])
    x_train, y_train = load_images(train, resolution)
    x_test, y_test, test_keys = load_samples(test, resolution, channels=x_train.shape[1])
    if x_test.shape[0] < 2:
        raise ValueError(f"early stopping needs at least 2 test images, {test} has {x_test.shape[0]}")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    half_a = early_stopping_split(test_keys)
    results: dict[str, dict] = {}
    for cm in battery:
        t_cm = time.perf_counter()
        xs_train, xs_test = preprocess(cm, x_train), preprocess(cm, x_test)
        finals, stopped, best_epochs, val_curves, hold_curves, by_class, f1s = [], [], [], [], [], [], []
        for seed in seeds:
            model, val_curve, hold_curve = train_countered_victim(
                xs_train,
                y_train,
                cm,
                arch=arch,
                epochs=epochs,
                num_classes=num_classes,
                x_val=xs_test[half_a],
                y_val=y_test[half_a],
                x_hold=xs_test[~half_a],
                y_hold=y_test[~half_a],
                batch_size=batch_size,
                lr=lr,
                pad=pad,
                flip=flip,
                seed=seed,
            )
            best = max(range(len(val_curve)), key=lambda i: (val_curve[i], -i))  # the first best epoch
            scores = final_scores(model, xs_test, y_test, num_classes)
            finals.append(scores["accuracy"])
            by_class.append(scores["class_accuracy"])
            f1s.append(scores["class_f1"])
            stopped.append(hold_curve[best])
            best_epochs.append(best + 1)
            val_curves.append(val_curve)
            hold_curves.append(hold_curve)
            log.info(
                "victim %s, %s, seed %d: final %.2f%%, early-stopped %.2f%% (epoch %d) on clean test images",
                arch,
                cm.text,
                seed,
                100 * finals[-1],
                100 * stopped[-1],
                best + 1,
            )
        mean_final, mean_stopped = statistics.fmean(finals), statistics.fmean(stopped)
        mean_by_class, mean_f1 = _mean_by_class(by_class), _mean_by_class(f1s)
        best_k, best_f1 = best_class(mean_f1)
        results[cm.text] = {
            "kind": cm.kind,
            "final_accuracy": finals,
            "early_stopped_accuracy": stopped,
            "best_epoch": best_epochs,
            "validation_curve": val_curves,
            "holdout_curve": hold_curves,
            "mean_final_accuracy": mean_final,
            "mean_early_stopped_accuracy": mean_stopped,
            # The final victims' accuracy and F1 on each class's test images: a release can protect some classes
            # and not others. F1 tells a class learned from one a victim answers for every image it does not know.
            "class_accuracy": by_class,
            "mean_class_accuracy": mean_by_class,
            "class_f1": f1s,
            "mean_class_f1": mean_f1,
            "best_class": {"class": best_k, "f1": best_f1, "accuracy": mean_by_class[best_k]},
            "worst": max(mean_final, mean_stopped),
            "seconds": round(time.perf_counter() - t_cm, 1),
        }
    worst_name = max(results, key=lambda k: results[k]["worst"])
    worst = results[worst_name]
    headline = results.get("none", next(iter(results.values())))
    return {
        "arch": arch,
        "epochs": epochs,
        "seeds": seeds,
        "test_accuracy": headline["final_accuracy"],
        "mean_accuracy": headline["mean_final_accuracy"],
        "countermeasures": results,
        "worst_case": {
            "countermeasure": worst_name,
            "accuracy": worst["worst"],
            "measure": "final"
            if worst["mean_final_accuracy"] >= worst["mean_early_stopped_accuracy"]
            else "early_stopped",
        },
        "train_samples": int(x_train.shape[0]),
        "test_samples": int(x_test.shape[0]),
        "validation_samples": int(half_a.sum()),
        "holdout_samples": int((~half_a).sum()),
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
    usage = "; ".join(spec.usage for spec in SPECS.values())
    p.add_argument(
        "--countermeasure",
        action="append",
        default=None,
        metavar="NAME[:ARG]",
        help=f"train one victim per seed under this countermeasure; repeatable. {usage}. jpeg, grayscale, "
        "blur and bdr transform the victim's training and test images; the others change its "
        "training loop. Without this and --countermeasures: none only",
    )
    p.add_argument(
        "--countermeasures",
        default=None,
        metavar="all|LIST",
        help="a comma-separated list of countermeasures (added to --countermeasure), or all: " + ", ".join(ALL),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (every countermeasure, every seed)")


def _table(result: dict) -> str:
    seeds = len(result["seeds"])
    lines = [
        f"{'victim':<14}{'countermeasure':<18}{'final':>9}{'early-stopped':>15}{'epoch':>7}{'worst':>9}"
        + f"{'best class (F1)':>17}"
        + ("   final per seed" if seeds > 1 else "")
    ]
    for name, r in result["countermeasures"].items():
        epochs = "/".join(str(e) for e in r["best_epoch"])
        line = (
            f"{result['arch']:<14}{name:<18}{100 * r['mean_final_accuracy']:>8.2f}%"
            f"{100 * r['mean_early_stopped_accuracy']:>14.2f}%{epochs:>7}{100 * r['worst']:>8.2f}%"
            f"{r['best_class']['class']:>9}: {r['best_class']['f1']:>5.2f} "
        )
        if seeds > 1:
            line += "   " + ", ".join(f"{100 * a:.2f}%" for a in r["final_accuracy"])
        lines.append(line)
    w = result["worst_case"]
    lines.append(
        f"worst case: {100 * w['accuracy']:.2f}% ({w['countermeasure']}, {w['measure'].replace('_', '-')}); "
        f"{result['train_samples']} train, {result['test_samples']} test (early stopping: "
        f"{result['validation_samples']} validation, {result['holdout_samples']} held out), "
        f"{result['seconds']} s"
    )
    return "\n".join(lines)


def evaluate_cli(args) -> int:
    battery = (args.countermeasure or []) + ([args.countermeasures] if args.countermeasures else [])
    result = evaluate(
        args.train,
        args.test,
        arch=args.arch,
        epochs=args.epochs,
        resolution=args.resolution,
        batch_size=args.batch_size,
        lr=args.lr,
        pad=args.pad,
        flip=args.flip,
        seeds=args.seed,
        countermeasures=battery or None,
    )
    print(json.dumps(result) if args.json else _table(result))
    return 0
