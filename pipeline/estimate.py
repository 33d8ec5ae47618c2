"""``protect --dry-run``: the frozen plan and an estimate of the work, without running anything.

The work of a round is counted in image-steps (one forward and backward pass of one image through the surrogate):
the noise stage takes ``pgd_steps`` of them per sample (the PGD sweep is ~97% of a round's FLOPs), the training
stage ``train_steps * batch_size``. Time comes from a rate the user measured with ``unlearnable bench`` on their
own GPU (``--rate``, image-steps per second, ``engine_img_steps_per_s`` of ``bench --json``); without one, only the
image-steps are given.

The plan is the one ``protect`` builds, so a corpus it refuses (no usable label, ``--num-classes`` too small) is
refused here too, with the same one line.
"""

from __future__ import annotations

from pipeline.config import ProtectConfig
from pipeline.plan import build_plan

TYPICAL_ROUNDS = 10  # the reference implementation needed about 10 rounds on CIFAR-10


def estimate(cfg: ProtectConfig, rate: float | None = None, workers: int | None = None) -> dict:
    cfg.resolved()
    from pipeline.executor import ray_pool

    reader = ray_pool.PlanReader(cfg.ray_address)  # as protect reads the corpus: Ray tasks for a large one
    try:
        plan = build_plan(cfg.inputs, cfg.num_classes, cfg.image_key, cfg.label_key, cfg.labels, reader=reader)
    finally:
        ray_pool.shutdown(reader.started)
    samples = plan.total_samples
    noise_steps = samples * cfg.pgd_steps
    train_steps = cfg.train_steps * cfg.batch_size
    per_round = noise_steps + train_steps
    out = {
        "plan": {
            "shards": len(plan.shards),
            "samples": samples,
            "classes": cfg.num_classes or plan.num_classes,
            # Integer labels, or class names with the ids the plan gave them (the first ones; the plan holds all).
            "labels": (
                {"kind": "clusters (k-means after the load)"}
                if cfg.labels == "cluster"
                else {"kind": "class names", "first_ids": {n: i for i, n in enumerate(plan.label_names[:10])}}
                if plan.label_names
                else {"kind": "integers"}
            ),
            "channels": plan.channels,
            "largest_shard": max((s.samples for s in plan.shards), default=0),
            "shard_ids": [s.id for s in plan.shards[:5]] + (["..."] if len(plan.shards) > 5 else []),
        },
        "work": {
            "mode": cfg.mode,
            "surrogate": cfg.surrogate,
            "resolution": cfg.resolution,
            "image_steps_per_round": per_round,
            "noise_image_steps_per_round": noise_steps,
            "train_image_steps_per_round": train_steps,
            "rounds_typical": TYPICAL_ROUNDS,
            "rounds_max": cfg.max_rounds,
            "image_steps_typical": per_round * TYPICAL_ROUNDS,
            "image_steps_max": per_round * cfg.max_rounds,
        },
    }
    if rate:
        hours = per_round / rate / 3600
        out["estimate"] = {
            "rate_img_steps_per_s_per_gpu": rate,
            "gpu_hours_per_round": round(hours, 4),
            "gpu_hours_typical": round(hours * TYPICAL_ROUNDS, 3),
            "gpu_hours_max": round(hours * cfg.max_rounds, 3),
            "note": "PGD and training only, at the measured step rate; decode, probe and export come on top",
        }
        if workers:
            out["estimate"]["wall_hours_typical_with_workers"] = round(hours * TYPICAL_ROUNDS / workers, 3)
    else:
        out["estimate"] = {
            "note": "pass --rate (engine_img_steps_per_s from `unlearnable bench --json` on your GPU) for GPU-hours"
        }
    return out
