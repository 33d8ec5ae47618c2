"""The protection probe: a fresh model trained briefly on released data, scored on clean originals.

Why held-out originals: the probe trains on the released images of 80% of the samples (chosen by a hash of the
key, so the split does not depend on worker count or shard order) and is scored on the clean originals of the
other 20%. That is the victim's situation: it never saw those clean images, so a high score can only come from
content it learned, not from memorised training images. The same recipe trained on the clean originals of the
training split gives ``probe_clean_accuracy``: if the probe cannot learn the clean content either, it cannot tell
protection from its own weakness, and the run is not reported as protected.
"""

from __future__ import annotations

import hashlib
import logging
import time

import torch

from ops.countermeasures import adversary, batch_augment, parse_countermeasure, preprocess
from surrogates import build
from surrogates.training import accuracy, best_class, final_scores, fit_epochs

log = logging.getLogger(__name__)

HOLDOUT_EVERY = 5  # one sample in five is held out for scoring


def holdout_mask(keys: list[str]) -> torch.Tensor:
    return torch.tensor(
        [int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], "little") % HOLDOUT_EVERY == 0 for k in keys],
        dtype=torch.bool,
    )


def probe_sample(keys: list[str], fraction: float) -> torch.Tensor:
    """The probe's sample of the corpus (``--probe-samples``): a bool mask, True for the keys whose hash falls in the
    first ``fraction`` of the hash range. Bytes 4 to 12 of the key's sha256, independent of the held-out split's
    (bytes 0 to 4), so the split keeps its share within the sample; the same keys whatever the workers or shards."""
    if fraction >= 1:
        return torch.ones(len(keys), dtype=torch.bool)
    cut = int(fraction * 2**64)
    return torch.tensor(
        [int.from_bytes(hashlib.sha256(k.encode()).digest()[4:12], "little") < cut for k in keys], dtype=torch.bool
    )


def early_stopping_split(keys: list[str]) -> torch.Tensor:
    """An adversary's small clean validation set: a bool mask over the scored samples, True for half A (picks the
    epoch), False for half B (scores it). Samples are ordered by sha256 of their key and cut in the middle, so the
    halves are disjoint, differ in size by at most one, and do not depend on shard order or on the seed."""
    order = sorted(range(len(keys)), key=lambda i: (hashlib.sha256(keys[i].encode()).digest(), i))
    mask = torch.zeros(len(keys), dtype=torch.bool)
    mask[order[: len(keys) // 2]] = True
    return mask


def probe_score(
    data: dict,
    source: str,
    *,
    arch: str,
    steps: int,
    num_classes: int,
    seed: int,
    countermeasure: str = "none",
    batch_size: int = 128,
) -> dict:
    """Train the probe on the ``source`` images ("released" or "clean") of the training split and score it on the
    clean originals of the held-out split. ``data`` holds ``released``, ``clean`` (uint8 N x C x R x R), ``labels``
    and ``keys``. The two sources are independent trainings: a pool runs them on two workers at once.

    ``countermeasure`` (``ops.countermeasures``: ``mixup``, ``at:4/255``...) is how an informed adversary trains: a
    preprocessing one applies to the images the probe trains on and is scored on. Besides its final accuracy, the
    probe reports its **early-stopped** accuracy: scored after every epoch on half of the held-out split, the epoch
    that half likes best is scored on the other half (an adversary with a small clean validation set). ``steps`` is
    rounded to whole epochs (the same steps when it is a multiple of an epoch)."""
    t0 = time.perf_counter()
    hold = holdout_mask(data["keys"])
    if hold.all() or not hold.any():
        raise ValueError("the protection probe needs at least 2 samples on each side of its held-out split")
    cm = parse_countermeasure(countermeasure)
    y = data["labels"]
    train_y, test_y = y[~hold], y[hold]
    x_train, x_test = preprocess(cm, data[source][~hold]), preprocess(cm, data["clean"][hold])
    half_a = early_stopping_split([k for k, h in zip(data["keys"], hold.tolist()) if h])
    n = x_train.shape[0]
    epochs = max(1, round(steps / max(1, n // min(batch_size, n))))
    curves: dict[str, list[float]] = {"a": [], "b": []}

    def score(epoch: int, model: torch.nn.Module) -> None:
        curves["a"].append(accuracy(model, x_test[half_a], test_y[half_a]))
        curves["b"].append(accuracy(model, x_test[~half_a], test_y[~half_a]))

    torch.manual_seed(seed)
    model = build(arch, num_classes, x_train.shape[1])
    fit_epochs(
        model,
        x_train,
        train_y,
        epochs=epochs,
        batch_size=batch_size,
        lr=0.05,
        seed=seed,
        augment=batch_augment(cm, num_classes),
        adversary=adversary(cm),
        on_epoch=score if half_a.any() and (~half_a).any() else None,
    )
    scores = final_scores(model, x_test, test_y, num_classes)
    final = scores["accuracy"]
    best = max(range(len(curves["a"])), key=lambda i: (curves["a"][i], -i)) if curves["a"] else None
    return {
        "countermeasure": cm.text,
        "arch": arch,
        "accuracy": final,
        "class_accuracy": scores["class_accuracy"],
        "class_f1": scores["class_f1"],
        "early_stopped_accuracy": curves["b"][best] if best is not None else final,
        "best_epoch": best + 1 if best is not None else epochs,
        "chance": float(torch.bincount(test_y, minlength=num_classes).max()) / max(int(test_y.numel()), 1),
        "train_samples": int((~hold).sum()),
        "test_samples": int(hold.sum()),
        "seconds": time.perf_counter() - t0,
    }


def judge(
    released: dict, clean_accuracy: float, *, arch: str, steps: int, threshold: float | None, margin: float
) -> dict:
    """The ``protection`` record of ``_SUCCESS.json`` from the released-trained score and the clean-trained reference."""
    chance = released["chance"]
    probe_accuracy = released["accuracy"]
    if threshold is None:
        threshold = chance + margin * (clean_accuracy - chance)
    # The probe only speaks for protection if it can learn the clean content beyond the threshold itself.
    discriminates = clean_accuracy > threshold
    holds = bool(discriminates and probe_accuracy <= threshold)
    if not discriminates:
        log.warning(
            "probe: %s reaches only %.1f%% on clean data (threshold %.1f%%): it cannot see protection; "
            "not reporting the run as protected",
            arch,
            100 * clean_accuracy,
            100 * threshold,
        )
    record = {
        "holds": holds,
        "probe_accuracy": round(probe_accuracy, 4),
        "probe_early_stopped_accuracy": round(released.get("early_stopped_accuracy", probe_accuracy), 4),
        "probe_best_epoch": released.get("best_epoch"),
        "probe_clean_accuracy": round(clean_accuracy, 4),
        "chance": round(chance, 4),
        "threshold": round(threshold, 4),
        "arch": arch,
        "steps": steps,
        "train_samples": released["train_samples"],
        "test_samples": released["test_samples"],
        "seconds": round(released["seconds"], 2),
    }
    # Each class's accuracy and F1: a release can leave whole classes learnable under a low mean. The best class is
    # the one of highest F1 (a probe that answers one class for every image it does not know has that class's
    # accuracy near 100%, not its F1).
    by_class, f1 = released.get("class_accuracy"), released.get("class_f1")
    if by_class and f1 and any(f is not None for f in f1):
        k, best = best_class(f1)
        record["probe_class_accuracy"] = [None if a is None else round(a, 4) for a in by_class]
        record["probe_class_f1"] = [None if f is None else round(f, 4) for f in f1]
        record["probe_best_class"] = {"class": k, "f1": round(best, 4), "accuracy": record["probe_class_accuracy"][k]}
    return record


def judge_battery(probe: dict, results: list[dict]) -> dict:
    """The countermeasure battery's record from the final probe (``judge``'s) and each countermeasure's released-
    trained score: every countermeasure holds when both its final and its early-stopped accuracy are at most the
    probe's threshold (and the probe can see protection at all); the battery holds when every one does. A score of
    another model than the probe's (``arch``) is recorded as ``COUNTERMEASURE@ARCH`` and judged by the same
    threshold."""
    threshold = probe["threshold"]
    discriminates = probe["probe_clean_accuracy"] > threshold
    record = {}
    for r in results:
        worst = max(r["accuracy"], r["early_stopped_accuracy"])
        arch = r.get("arch") or probe["arch"]
        record[r["countermeasure"] + ("" if arch == probe["arch"] else f"@{arch}")] = {
            "accuracy": round(r["accuracy"], 4),
            "early_stopped_accuracy": round(r["early_stopped_accuracy"], 4),
            "best_epoch": r["best_epoch"],
            "worst": round(worst, 4),
            "holds": bool(discriminates and worst <= threshold),
            "seconds": round(r["seconds"], 2),
        }
    worst_name = max(record, key=lambda k: record[k]["worst"])
    return {
        "holds": all(c["holds"] for c in record.values()),
        "countermeasures": record,
        "worst_case": {"countermeasure": worst_name, "accuracy": record[worst_name]["worst"]},
    }
