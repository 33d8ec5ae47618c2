"""After the rounds: the run's record (``_SUCCESS.json``: what was released, how it was made, whether the probe saw
it protected) and the verdict the user reads, with the exit status that goes with it."""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass

from pipeline.exits import EXIT_OK, EXIT_UNPROTECTED
from pipeline.storage import fs
from pipeline.storage.layout import Layout

log = logging.getLogger(__name__)

# Why a --labels cluster release is never reported protected (_SUCCESS.json's protection.why).
UNCERTIFIED_CLUSTERS = (
    "with --labels cluster the probe learns the clusters, not the classes a victim trains on, so "
    "it cannot tell whether the release protects (on MNIST-5k it read 12.6% while small-cnn "
    "victims trained with the true labels reached 94%)"
)
# Config fields that say where the originals and the noise state live: kept out of the public _SUCCESS.json.
PRIVATE_CONFIG = ("inputs", "work_dir", "ray_address")
# The plain probe's figures that _SUCCESS.json's protection record carries.
PROBE_FIELDS = (
    "holds",
    "probe_accuracy",
    "probe_clean_accuracy",
    "chance",
    "threshold",
    "arch",
    "steps",
    "train_samples",
    "test_samples",
)
OPTIONAL_PROBE_FIELDS = ("probe_class_accuracy", "probe_class_f1", "probe_best_class")


@dataclass
class RunResult:
    exit_code: int
    success: dict | None


def exit_status(success: dict) -> int:
    """A finished release's exit status: 0 when it holds, 4 when it does not (or cannot be certified)."""
    return EXIT_OK if success["protection"]["holds"] else EXIT_UNPROTECTED


def protection_record(final: dict, battery: dict | None, labels: str) -> dict:
    """The release's protection: the final round's plain probe, its countermeasure battery (protected only when the
    plain probe and every countermeasure of it hold), never certified with ``--labels cluster``."""
    protection = {k: final["probe"][k] for k in PROBE_FIELDS}
    for k in OPTIONAL_PROBE_FIELDS:  # recorded by this version's probe (not in rounds a previous version finished)
        if k in final["probe"]:
            protection[k] = final["probe"][k]
    protection["probe_holds"] = protection["holds"]  # the plain probe's verdict: the stop rule's
    if battery is not None:
        protection.update(
            holds=protection["holds"] and battery["holds"],
            countermeasures=battery["countermeasures"],
            worst_case=battery["worst_case"],
        )
    if labels == "cluster":
        # The probe learns the clusters, not the classes a victim trains on: its verdict cannot certify the
        # release (measured on MNIST-5k: the probe read 12.6%, victims trained with the true labels 94%).
        protection.update(holds=False, certified=False, why=UNCERTIFIED_CLUSTERS)
    return protection


def success_record(
    config: dict,
    hashed_config: dict,
    chash: str,
    plan_digest: str,
    shards: int,
    history: list[dict],
    battery: dict | None,
    counts: dict,
    timings: dict,
) -> dict:
    """``_SUCCESS.json``'s content. Public: where the originals and the noise live stays in the work dir's run.json."""
    final = history[-1]
    return {
        "config": {k: v for k, v in config.items() if k not in PRIVATE_CONFIG},
        "config_hash": chash,
        "plan_digest": plan_digest,
        "hashed_config": hashed_config,
        "versions": versions(),
        "rounds": final["round"] + 1,
        "stop_reason": "stop_rule" if final["stop"] else "max_rounds",
        "surrogate_error": final["error"],
        "protection": protection_record(final, battery, config["labels"]),
        "counts": counts,
        "shards": shards,
        "history": [
            {
                "round": h["round"],
                "error": h["error"],
                "image_steps": h.get("image_steps", 0),
                "probe_accuracy": h["probe"]["probe_accuracy"] if h.get("probe") else None,
            }
            for h in history
        ],
        "timings": {k: round(v, 2) for k, v in timings.items()},
        # PGD image-steps actually taken (rounds done before a resume included): the work the release cost.
        "image_steps": sum(h.get("image_steps", 0) for h in history),
    }


def write_success(layout: Layout, success: dict) -> None:
    """``_SUCCESS.json``: written last of all, its presence means the release is complete."""
    fs.write_bytes(layout.success, json.dumps(success, indent=2, default=str).encode())


def report(success: dict) -> RunResult:
    """Tell the user what was released and whether it protects; the run's exit status."""
    protection, counts = success["protection"], success["counts"]
    if success["stop_reason"] == "max_rounds":
        log.warning(
            "!!! reached --max-rounds %d without meeting the stop rule (error %.4f, probe %.1f%% against "
            "threshold %.1f%%): released anyway",
            success["config"]["max_rounds"],
            success["surrogate_error"],
            100 * protection["probe_accuracy"],
            100 * protection["threshold"],
        )
    best = protection.get("probe_best_class")
    if protection["holds"] and best and best["f1"] >= learned_class_level(protection):
        names = success["config"].get("label_names") or []
        log.warning(
            "the probe learned class %s on clean held-out images (F1 %.2f, accuracy %.1f%%; %.1f%% overall, "
            "clean-trained %.1f%%): the release may leave that class learnable; see protection.probe_class_f1",
            f"{best['class']} ({names[best['class']]!r})" if best["class"] < len(names) else best["class"],
            best["f1"],
            100 * best["accuracy"],
            100 * protection["probe_accuracy"],
            100 * protection["probe_clean_accuracy"],
        )
    if protection["holds"]:
        log.info(
            "release complete: %d protected, %d rejected; probe %.1f%% <= threshold %.1f%% (chance %.1f%%)",
            counts["protected"],
            counts["rejected"],
            100 * protection["probe_accuracy"],
            100 * protection["threshold"],
            100 * protection["chance"],
        )
        return RunResult(EXIT_OK, success)
    if protection.get("certified") is False:
        log.error(
            "!!! PROTECTION NOT CERTIFIED: %s. The release is written; measure it with `unlearnable "
            "evaluate` on labelled data before publishing.",
            protection["why"],
        )
        return RunResult(EXIT_UNPROTECTED, success)
    worst = protection.get("worst_case") or {"countermeasure": "none", "accuracy": protection["probe_accuracy"]}
    countermeasure, _, arch = worst["countermeasure"].partition("@")  # NAME@ARCH: another --probe-arch's score
    log.error(
        "!!! PROTECTION DOES NOT HOLD: a fresh %s trained on the release reaches %.1f%% on clean held-out "
        "images (under %s; threshold %.1f%%, chance %.1f%%). The release is written but is NOT protected.",
        arch or protection["arch"],
        100 * max(worst["accuracy"], protection["probe_accuracy"]),
        countermeasure,
        100 * protection["threshold"],
        100 * protection["chance"],
    )
    return RunResult(EXIT_UNPROTECTED, success)


def learned_class_level(protection: dict) -> float:
    """A class whose F1 under the probe is at or above this is largely learned: halfway from the threshold to what
    the clean-trained probe reaches overall (a clean-trained model's F1 on a class is about its accuracy)."""
    return (protection["threshold"] + protection["probe_clean_accuracy"]) / 2


def versions() -> dict:
    import ray
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "unlearnable": _own_version(),
    }


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unlearnable")
    except PackageNotFoundError:
        return "unknown"
