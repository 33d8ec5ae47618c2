"""The coordinator: freezes the plan, starts the worker pool, runs rounds until the stop rule, then the export.

A round is: (1) surrogate training, (2) the noise update of every shard, (3) the stop check: the surrogate's error
on the data as it will be released and, when that error is low enough, the protection probe. The coordinator holds
no image data: workers load shards, keep the noise state and write the release.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline import pool
from pipeline.config import PROBE_MARGIN, ProtectConfig, config_hash, differing_fields
from pipeline.plan import Plan, build_plan
from pipeline.probe import run_probe
from pipeline.storage import fs, manifest
from pipeline.storage.layout import Layout, check_work_dir_outside, default_work_dir
from pipeline.storage.markers import is_done, read_marker, write_marker

log = logging.getLogger(__name__)

EXIT_OK, EXIT_BAD_ARGS, EXIT_INCOMPLETE, EXIT_UNPROTECTED = 0, 2, 3, 4
KEEP_ROUNDS = 2  # noise state and checkpoints of the last two rounds are kept; older ones are deleted


class ConfigRefused(ValueError):
    """A different config against an existing output, or arguments that cannot run."""


@dataclass
class RunResult:
    exit_code: int
    success: dict | None


def _read_json(url: str) -> dict | None:
    try:
        return json.loads(fs.read_bytes(url))
    except FileNotFoundError:
        return None


def _versions() -> dict:
    import ray

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "unlearnable": _own_version()}


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unlearnable")
    except PackageNotFoundError:
        return "unknown"


def prepare_run(cfg: ProtectConfig) -> tuple[Layout, Plan, str]:
    """Resolve paths, freeze (or reload) the plan, check the config against an existing run."""
    cfg.resolved()
    output = fs.strip_url(cfg.output)
    work = fs.strip_url(cfg.work_dir) if cfg.work_dir else default_work_dir(output)
    check_work_dir_outside(output, work)
    layout = Layout(output, work)
    if cfg.overwrite:
        log.warning("--overwrite: removing the previous release in %s and work dir %s", output, work)
        fs.remove(work, recursive=True)
        fs.remove(output, recursive=True)
    record = _read_json(layout.run_record)
    if record is not None and fs.exists(layout.plan):
        plan = Plan.from_parquet(fs.read_bytes(layout.plan))
    else:
        plan = build_plan(cfg.inputs, cfg.num_classes, cfg.image_key, cfg.label_key)
    if cfg.num_classes is None:
        cfg.num_classes = plan.num_classes
    digest = plan.digest
    chash = config_hash(cfg, digest)
    previous = record or _read_json(layout.success)
    if previous is not None and previous.get("config_hash") != chash:
        recorded = dict(previous.get("hashed_config") or {}, plan=previous.get("plan_digest"))
        current = dict(cfg.hashed_fields(), plan=digest)
        fields = differing_fields(recorded, current) or ["(input plan)"]
        raise ConfigRefused(
            f"{output} belongs to a run with a different config (differs in: {', '.join(fields)}); "
            "rerun with the same arguments to resume, or pass --overwrite to start over"
        )
    if record is None:
        fs.write_bytes(layout.plan, plan.to_parquet())
        run = {"config": cfg.to_dict(), "hashed_config": cfg.hashed_fields(), "config_hash": chash,
               "plan_digest": digest, "created": time.time()}
        fs.write_bytes(layout.run_record, json.dumps(run, indent=2, default=str).encode())
    return layout, plan, chash


def protect(cfg: ProtectConfig) -> RunResult:
    """Run (or resume) a protection; returns the exit status of DESIGN.md and the ``_SUCCESS.json`` record."""
    t_start = time.perf_counter()
    layout, plan, chash = prepare_run(cfg)
    done = _read_json(layout.success)
    if done is not None and done.get("config_hash") == chash:
        log.info("release in %s is already complete", layout.output)
        return RunResult(EXIT_OK if done["protection"]["holds"] else EXIT_UNPROTECTED, done)
    if cfg.workers is not None and cfg.workers > 1:
        raise ConfigRefused("--workers > 1 needs data-parallel surrogate training, which is not built yet; use 1")

    timings: dict[str, float] = {"load": 0.0, "train": 0.0, "noise": 0.0, "check": 0.0, "probe": 0.0, "export": 0.0}
    started = pool.connect(cfg.ray_address)
    try:
        workers = pool.start_workers(cfg.to_dict(), plan.num_classes, plan.channels, cfg.workers,
                                     cfg.gpus_per_worker, cfg.cpus_per_worker)
        worker = workers[0]
        t0 = time.perf_counter()
        loads = []
        for shard in tqdm(plan.shards, desc="load shards", unit="shard", file=sys.stderr):
            loads.append(pool.get(worker.load_shard.remote(shard.id, shard.url)))
        timings["load"] += time.perf_counter() - t0
        accepted = sum(x["accepted"] for x in loads)
        if accepted == 0:
            raise ConfigRefused("no sample of the corpus can be protected (every sample was rejected)")
        history, last = _resume(layout, chash, plan, worker)
        clean_ref = (_read_json(layout.probe_record) or {}).get("probe_clean_accuracy")
        start_round = last + 1
        stop = history[-1] if history and history[-1].get("stop") else None
        rounds = tqdm(range(start_round, cfg.max_rounds), desc="rounds", unit="round", file=sys.stderr,
                      initial=start_round, total=cfg.max_rounds)
        for r in rounds if stop is None else []:
            record = _run_round(r, cfg, plan, layout, chash, worker, timings, clean_ref, final=r == cfg.max_rounds - 1)
            if record.get("probe"):
                clean_ref = record["probe"]["probe_clean_accuracy"]
            history.append(record)
            rounds.set_postfix(error=f"{record['error']:.4f}")
            if record["stop"]:
                stop = record
                break
        rounds.close()
        final = history[-1]
        if final.get("probe") is None:  # resumed past max_rounds without a probe on the last round
            final = _run_round(final["round"], cfg, plan, layout, chash, worker, timings, clean_ref, final=True,
                               train=False)
            history[-1] = final
        stop_reason = "stop_rule" if final["stop"] else "max_rounds"
        protection = {k: final["probe"][k] for k in ("holds", "probe_accuracy", "probe_clean_accuracy", "chance",
                                                      "threshold", "arch", "steps")}
        if stop_reason == "max_rounds":
            log.warning("!!! reached --max-rounds %d without meeting the stop rule (error %.4f, probe %.1f%% against "
                        "threshold %.1f%%): releasing anyway", cfg.max_rounds, final["error"],
                        100 * protection["probe_accuracy"], 100 * protection["threshold"])

        t0 = time.perf_counter()
        counts = {"input": 0, "protected": 0, "rejected": 0}
        for shard in tqdm(plan.shards, desc="export", unit="shard", file=sys.stderr):
            marker_url = layout.shard_marker(shard.id)
            if not is_done(marker_url, chash):
                pool.get(worker.export_shard.remote(shard.id, layout.output, layout.work, chash))
            stats = read_marker(marker_url)
            for k in counts:
                counts[k] += stats[k]
        merged = manifest.merge([fs.read_bytes(layout.shard_manifest(s.id)) for s in plan.shards])
        fs.write_verified(layout.manifest, merged)
        timings["export"] += time.perf_counter() - t0
    finally:
        pool.shutdown(started)

    timings["total"] = time.perf_counter() - t_start
    success = {
        "config": cfg.to_dict(),
        "config_hash": chash,
        "plan_digest": plan.digest,
        "hashed_config": cfg.hashed_fields(),
        "versions": _versions(),
        "rounds": final["round"] + 1,
        "stop_reason": stop_reason,
        "surrogate_error": final["error"],
        "protection": protection,
        "counts": counts,
        "work_dir": layout.work,
        "history": [{"round": h["round"], "error": h["error"],
                     "probe_accuracy": h["probe"]["probe_accuracy"] if h.get("probe") else None} for h in history],
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    # _SUCCESS.json is written last of all: its presence means the release is complete.
    fs.write_bytes(layout.success, json.dumps(success, indent=2, default=str).encode())
    if not cfg.keep_work:
        fs.remove(layout.work, recursive=True)
    if protection["holds"]:
        log.info("release complete: %d protected, %d rejected; probe %.1f%% <= threshold %.1f%% (chance %.1f%%)",
                 counts["protected"], counts["rejected"], 100 * protection["probe_accuracy"],
                 100 * protection["threshold"], 100 * protection["chance"])
        return RunResult(EXIT_OK, success)
    log.error("!!! PROTECTION DOES NOT HOLD: a fresh %s trained on the release reaches %.1f%% on clean held-out "
              "images (threshold %.1f%%, chance %.1f%%). The release is written but is NOT protected.",
              protection["arch"], 100 * protection["probe_accuracy"], 100 * protection["threshold"],
              100 * protection["chance"])
    return RunResult(EXIT_UNPROTECTED, success)


def _resume(layout: Layout, chash: str, plan: Plan, worker) -> tuple[list[dict], int]:
    """Records of the finished rounds, and the noise state and surrogate of the last one loaded into the worker."""
    history: list[dict] = []
    r = 0
    while True:
        marker = read_marker(layout.round_marker(r))
        if marker is None or marker.get("config_hash") != chash:
            break
        history.append(marker)
        r += 1
    last = r - 1
    if last >= 0:
        log.info("resuming after round %d", last)
        pool.get(worker.restore.remote(fs.read_bytes(layout.checkpoint(last))))
        mode_classwise = history[-1].get("mode") == "classwise"
        if mode_classwise:
            pool.get(worker.load_noise_state.remote(None, fs.read_bytes(layout.noise_state(last, "_classes"))))
        else:
            for shard in plan.shards:
                pool.get(worker.load_noise_state.remote(shard.id, fs.read_bytes(layout.noise_state(last, shard.id))))
    return history, last


def _run_round(r: int, cfg: ProtectConfig, plan: Plan, layout: Layout, chash: str, worker, timings: dict,
               clean_ref: float | None, final: bool, train: bool = True) -> dict:
    record: dict = {"round": r, "mode": cfg.mode}
    if train:
        t0 = time.perf_counter()
        record["train"] = pool.get(worker.train_stage.remote())
        timings["train"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        image_steps = 0
        for shard in plan.shards:
            image_steps += pool.get(worker.noise_stage.remote(shard.id))["image_steps"]
        if cfg.mode == "classwise":
            sums, counts = pool.get(worker.class_update_sums.remote())
            pool.get(worker.apply_class_update.remote(sums, counts))
        record["image_steps"] = image_steps
        timings["noise"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    err = pool.get(worker.released_error.remote())
    record["error"] = round(err["wrong"] / max(err["total"], 1), 6)
    timings["check"] += time.perf_counter() - t0
    record["probe"] = None
    if record["error"] <= cfg.stop_error or final:
        t0 = time.perf_counter()
        record["probe"] = pool.get(worker.run_probe.remote(clean_ref, cfg.probe_threshold, PROBE_MARGIN))
        timings["probe"] += time.perf_counter() - t0
        if clean_ref is None:
            fs.write_bytes(layout.probe_record, json.dumps(
                {"config_hash": chash, "probe_clean_accuracy": record["probe"]["probe_clean_accuracy"]}).encode())
    record["stop"] = bool(record["error"] <= cfg.stop_error and record["probe"] and record["probe"]["holds"])
    probe_txt = ""
    if record["probe"]:
        p = record["probe"]
        probe_txt = (f"; probe {p['arch']} {100 * p['probe_accuracy']:.1f}% on clean held-out "
                     f"(threshold {100 * p['threshold']:.1f}%, {'holds' if p['holds'] else 'does NOT hold'})")
    log.info("round %d: surrogate error on released data %.4f (stop at %.4f)%s", r, record["error"], cfg.stop_error,
             probe_txt)
    if train:
        _commit_round(r, cfg, plan, layout, chash, worker, record)
    return record


def _commit_round(r: int, cfg: ProtectConfig, plan: Plan, layout: Layout, chash: str, worker, record: dict) -> None:
    """Noise state and checkpoint first, the round marker last; then drop rounds older than the last two."""
    fs.write_verified(layout.checkpoint(r), pool.get(worker.checkpoint.remote()))
    if cfg.mode == "classwise":
        fs.write_verified(layout.noise_state(r, "_classes"), pool.get(worker.noise_state.remote(None)))
    else:
        for shard in plan.shards:
            fs.write_verified(layout.noise_state(r, shard.id), pool.get(worker.noise_state.remote(shard.id)))
    write_marker(layout.round_marker(r), chash, **{k: v for k, v in record.items() if k != "config_hash"})
    old = r - KEEP_ROUNDS
    if old >= 0:
        fs.remove(layout.checkpoint(old))
        fs.remove(os.path.dirname(layout.noise_state(old, "x")) if fs.is_local(layout.work)
                  else fs.join(layout.round_dir(old), "noise"), recursive=True)
