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

from surrogates import build
from surrogates.training import accuracy, fit

log = logging.getLogger(__name__)

HOLDOUT_EVERY = 5  # one sample in five is held out for scoring


def holdout_mask(keys: list[str]) -> torch.Tensor:
    return torch.tensor(
        [int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], "little") % HOLDOUT_EVERY == 0 for k in keys],
        dtype=torch.bool,
    )


def train_probe(arch: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build(arch, num_classes, x.shape[1])
    return fit(model, x, y, steps=steps, batch_size=128, lr=0.05, seed=seed)


def probe_score(data: dict, source: str, *, arch: str, steps: int, num_classes: int, seed: int) -> dict:
    """Train the probe on the ``source`` images ("released" or "clean") of the training split and score it on the
    clean originals of the held-out split. ``data`` holds ``released``, ``clean`` (uint8 N x C x R x R), ``labels``
    and ``keys``. The two sources are independent trainings: a pool runs them on two workers at once."""
    t0 = time.perf_counter()
    hold = holdout_mask(data["keys"])
    if hold.all() or not hold.any():
        raise ValueError("the protection probe needs at least 2 samples on each side of its held-out split")
    y = data["labels"]
    train_y, test_y = y[~hold], y[hold]
    model = train_probe(arch, data[source][~hold], train_y, num_classes, steps, seed)
    return {
        "accuracy": accuracy(model, data["clean"][hold], test_y),
        "chance": float(torch.bincount(test_y, minlength=num_classes).max()) / max(int(test_y.numel()), 1),
        "train_samples": int((~hold).sum()),
        "test_samples": int(hold.sum()),
        "seconds": time.perf_counter() - t0,
    }


def judge(released: dict, clean_accuracy: float, *, arch: str, steps: int, threshold: float | None,
          margin: float) -> dict:
    """The ``protection`` record of DESIGN.md from the released-trained score and the clean-trained reference."""
    chance = released["chance"]
    probe_accuracy = released["accuracy"]
    if threshold is None:
        threshold = chance + margin * (clean_accuracy - chance)
    # The probe only speaks for protection if it can learn the clean content beyond the threshold itself.
    discriminates = clean_accuracy > threshold
    holds = bool(discriminates and probe_accuracy <= threshold)
    if not discriminates:
        log.warning("probe: %s reaches only %.1f%% on clean data (threshold %.1f%%): it cannot see protection; "
                    "not reporting the run as protected", arch, 100 * clean_accuracy, 100 * threshold)
    return {
        "holds": holds,
        "probe_accuracy": round(probe_accuracy, 4),
        "probe_clean_accuracy": round(clean_accuracy, 4),
        "chance": round(chance, 4),
        "threshold": round(threshold, 4),
        "arch": arch,
        "steps": steps,
        "train_samples": released["train_samples"],
        "test_samples": released["test_samples"],
        "seconds": round(released["seconds"], 2),
    }


def run_probe(
    data: dict,
    *,
    arch: str,
    steps: int,
    num_classes: int,
    seed: int,
    clean_accuracy: float | None,
    threshold: float | None,
    margin: float,
) -> dict:
    """Probe the release in one process: the clean-trained reference (unless ``clean_accuracy`` is known from an
    earlier probe of this run), the released-trained probe, and the verdict."""
    kw = dict(arch=arch, steps=steps, num_classes=num_classes, seed=seed)
    if clean_accuracy is None:
        clean_accuracy = probe_score(data, "clean", **kw)["accuracy"]
    return judge(probe_score(data, "released", **kw), clean_accuracy, arch=arch, steps=steps, threshold=threshold,
                 margin=margin)
