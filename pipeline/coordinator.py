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

from pipeline import faults, pool
from pipeline.lease import Lease, LeaseHeld
from pipeline.config import PROBE_MARGIN, ProtectConfig, config_hash, differing_fields
from pipeline.plan import Plan, build_plan
from pipeline.probe import run_probe
from pipeline.storage import fs, manifest
from pipeline.storage.layout import Layout, check_work_dir_outside, default_work_dir
from pipeline.storage.markers import is_done, read_marker, write_marker

log = logging.getLogger(__name__)

EXIT_OK, EXIT_BAD_ARGS, EXIT_INCOMPLETE, EXIT_UNPROTECTED = 0, 2, 3, 4
KEEP_ROUNDS = 2  # noise state and checkpoints of the last two rounds are kept; older ones are deleted


MAX_WORKER_REPLACEMENTS = 3


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
    lease = Lease(layout.lease)
    lease.acquire()
    started = pool.connect(cfg.ray_address)
    run = Run(cfg, layout, plan, chash)
    try:
        for replacement in range(MAX_WORKER_REPLACEMENTS + 1):
            try:
                run.start_worker()
                run.rounds()
                run.export()
                break
            except pool.WorkerDied as exc:
                if replacement == MAX_WORKER_REPLACEMENTS:
                    raise
                log.warning("worker died (%s); starting a new one and resuming from the last committed unit", exc)
                run.stop_worker()
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            _record_error(layout, exc)
        raise
    finally:
        pool.shutdown(started)
        lease.release()
    return run.finish(t_start)


def _record_error(layout: Layout, exc: BaseException) -> None:
    try:
        fs.write_bytes(layout.last_error, json.dumps({"error": f"{type(exc).__name__}: {exc}", "time": time.time()})
                       .encode())
    except OSError:
        log.warning("could not record the error in the work dir")


class Run:
    """One coordinator's pass over a run: resume from the markers, rounds, export, the run record."""

    def __init__(self, cfg: ProtectConfig, layout: Layout, plan: Plan, chash: str) -> None:
        self.cfg, self.layout, self.plan, self.chash = cfg, layout, plan, chash
        self.timings: dict[str, float] = dict.fromkeys(("load", "train", "noise", "check", "probe", "export"), 0.0)
        self.worker = None
        self.history: list[dict] = []
        self.counts = {"input": 0, "protected": 0, "rejected": 0}

    # ---- workers ----------------------------------------------------------------------------------------------
    def start_worker(self) -> None:
        cfg, plan = self.cfg, self.plan
        self.worker = pool.start_workers(cfg.to_dict(), plan.num_classes, plan.channels, cfg.workers,
                                         cfg.gpus_per_worker, cfg.cpus_per_worker)[0]
        t0 = time.perf_counter()
        accepted = 0
        for shard in tqdm(plan.shards, desc="load shards", unit="shard", file=sys.stderr):
            loaded = pool.get(self.worker.load_shard.remote(shard.id, shard.url))
            accepted += loaded["accepted"]
            if loaded["read_error"]:
                log.warning("shard %s: %s", shard.id, loaded["read_error"])
        self.timings["load"] += time.perf_counter() - t0
        if accepted == 0:
            raise ConfigRefused("no sample of the corpus can be protected (every sample was rejected)")

    def stop_worker(self) -> None:
        pool.kill(self.worker)
        self.worker = None

    def _attempt(self, unit: str, r: int | None = None, shard: str | None = None) -> None:
        """Log that a unit of work starts (the attempt log lets tests prove nothing finished is redone)."""
        faults.at_unit("coordinator", unit, r, shard)
        name = f"{unit}-r{r if r is not None else ''}-{shard or ''}-{time.time_ns()}.json"
        fs.write_bytes(fs.join(self.layout.attempts, name),
                       json.dumps({"unit": unit, "round": r, "shard": shard, "pid": os.getpid()}).encode())

    # ---- rounds -----------------------------------------------------------------------------------------------
    def _finished_rounds(self) -> list[dict]:
        history, r = [], 0
        while True:
            marker = read_marker(self.layout.round_marker(r))
            if marker is None or marker.get("config_hash") != self.chash:
                return history
            history.append(marker)
            r += 1

    def _load_noise(self, r: int, shards) -> None:
        for shard in shards:
            pool.get(self.worker.load_noise_state.remote(shard, fs.read_bytes(self.layout.noise_state(r, shard))))

    def rounds(self) -> None:
        cfg, layout = self.cfg, self.layout
        self.history = self._finished_rounds()
        clean_ref = (_read_json(layout.probe_record) or {}).get("probe_clean_accuracy")
        last = len(self.history) - 1
        if last >= 0:
            log.info("resuming after round %d", last)
            pool.get(self.worker.restore.remote(fs.read_bytes(layout.checkpoint(last))))
            self._load_noise(last, self._noise_units())
        if self.history and self.history[-1]["stop"]:
            return
        bar = tqdm(range(last + 1, cfg.max_rounds), desc="rounds", unit="round", file=sys.stderr,
                   initial=last + 1, total=cfg.max_rounds)
        for r in bar:
            record = self._round(r, clean_ref, final=r == cfg.max_rounds - 1)
            if record.get("probe"):
                clean_ref = record["probe"]["probe_clean_accuracy"]
            self.history.append(record)
            bar.set_postfix(error=f"{record['error']:.4f}")
            if record["stop"]:
                break
        bar.close()
        if self.history and self.history[-1].get("probe") is None:
            # Resumed with --max-rounds at or below the rounds already done: probe the last round's release.
            self.history[-1] = {**self.history[-1], "probe": self._probe(clean_ref)}

    def _noise_units(self) -> list[str]:
        return ["_classes"] if self.cfg.mode == "classwise" else [s.id for s in self.plan.shards]

    def _round(self, r: int, clean_ref: float | None, final: bool) -> dict:
        cfg, layout, worker = self.cfg, self.layout, self.worker
        record: dict = {"round": r, "mode": cfg.mode}
        # Stage 1: training. Its checkpoint is the unit's output, so a resumed round never retrains.
        t0 = time.perf_counter()
        if is_done(layout.train_marker(r), self.chash):
            pool.get(worker.restore.remote(fs.read_bytes(layout.checkpoint(r))))
        else:
            self._attempt("train", r)
            record["train"] = pool.get(worker.train_stage.remote())
            fs.write_verified(layout.checkpoint(r), pool.get(worker.checkpoint.remote()))
            write_marker(layout.train_marker(r), self.chash, **record["train"])
        self.timings["train"] += time.perf_counter() - t0
        # Stage 2: noise, one unit per shard (class-wise: one unit for the class noise).
        t0 = time.perf_counter()
        image_steps = 0
        if cfg.mode == "classwise":
            if is_done(layout.noise_marker(r, "_classes"), self.chash):
                self._load_noise(r, ["_classes"])
            else:
                self._attempt("noise", r, "_classes")
                for shard in self.plan.shards:
                    image_steps += pool.get(worker.noise_stage.remote(shard.id, r))["image_steps"]
                sums, counts = pool.get(worker.class_update_sums.remote())
                pool.get(worker.apply_class_update.remote(sums, counts))
                self._commit_noise(r, "_classes")
        else:
            for shard in tqdm(self.plan.shards, desc=f"round {r} noise", unit="shard", file=sys.stderr, leave=False):
                if is_done(layout.noise_marker(r, shard.id), self.chash):
                    self._load_noise(r, [shard.id])
                    continue
                self._attempt("noise", r, shard.id)
                image_steps += pool.get(worker.noise_stage.remote(shard.id, r))["image_steps"]
                self._commit_noise(r, shard.id)
        record["image_steps"] = image_steps
        self.timings["noise"] += time.perf_counter() - t0
        # Stage 3: the stop check on the data as it will be released, and the probe when the error rule holds.
        self._attempt("check", r)
        t0 = time.perf_counter()
        err = pool.get(worker.released_error.remote())
        record["error"] = round(err["wrong"] / max(err["total"], 1), 6)
        self.timings["check"] += time.perf_counter() - t0
        record["probe"] = self._probe(clean_ref) if record["error"] <= cfg.stop_error or final else None
        record["stop"] = bool(record["error"] <= cfg.stop_error and record["probe"] and record["probe"]["holds"])
        probe_txt = ""
        if record["probe"]:
            p = record["probe"]
            probe_txt = (f"; probe {p['arch']} {100 * p['probe_accuracy']:.1f}% on clean held-out "
                         f"(threshold {100 * p['threshold']:.1f}%, {'holds' if p['holds'] else 'does NOT hold'})")
        log.info("round %d: surrogate error on released data %.4f (stop at %.4f)%s", r, record["error"],
                 cfg.stop_error, probe_txt)
        write_marker(layout.round_marker(r), self.chash, **record)
        old = r - KEEP_ROUNDS
        if old >= 0:  # keep the last two rounds' noise state and checkpoints; the round records stay
            fs.remove(layout.checkpoint(old))
            fs.remove(fs.join(layout.round_dir(old), "noise"), recursive=True)
        return record

    def _commit_noise(self, r: int, unit: str) -> None:
        """Noise state first, verified; its marker last."""
        shard = None if unit == "_classes" else unit
        sha = fs.write_verified(self.layout.noise_state(r, unit), pool.get(self.worker.noise_state.remote(shard)))
        write_marker(self.layout.noise_marker(r, unit), self.chash, sha256=sha)

    def _probe(self, clean_ref: float | None) -> dict:
        t0 = time.perf_counter()
        probe = pool.get(self.worker.run_probe.remote(clean_ref, self.cfg.probe_threshold, PROBE_MARGIN))
        self.timings["probe"] += time.perf_counter() - t0
        if clean_ref is None:
            fs.write_bytes(self.layout.probe_record, json.dumps(
                {"config_hash": self.chash, "probe_clean_accuracy": probe["probe_clean_accuracy"]}).encode())
        return probe

    # ---- export -----------------------------------------------------------------------------------------------
    def export(self) -> None:
        t0 = time.perf_counter()
        layout = self.layout
        self.counts = {"input": 0, "protected": 0, "rejected": 0}
        for shard in tqdm(self.plan.shards, desc="export", unit="shard", file=sys.stderr):
            if not is_done(layout.shard_marker(shard.id), self.chash):
                self._attempt("export", None, shard.id)
                pool.get(self.worker.export_shard.remote(shard.id, layout.output, layout.work, self.chash))
            stats = read_marker(layout.shard_marker(shard.id))
            for k in self.counts:
                self.counts[k] += stats[k]
        merged = manifest.merge([fs.read_bytes(layout.shard_manifest(s.id)) for s in self.plan.shards])
        fs.write_verified(layout.manifest, merged)
        self.timings["export"] += time.perf_counter() - t0

    def finish(self, t_start: float) -> RunResult:
        cfg, layout = self.cfg, self.layout
        final = self.history[-1]
        stop_reason = "stop_rule" if final["stop"] else "max_rounds"
        protection = {k: final["probe"][k] for k in ("holds", "probe_accuracy", "probe_clean_accuracy", "chance",
                                                      "threshold", "arch", "steps")}
        if stop_reason == "max_rounds":
            log.warning("!!! reached --max-rounds %d without meeting the stop rule (error %.4f, probe %.1f%% against "
                        "threshold %.1f%%): released anyway", cfg.max_rounds, final["error"],
                        100 * protection["probe_accuracy"], 100 * protection["threshold"])
        self.timings["total"] = time.perf_counter() - t_start
        success = {
            "config": cfg.to_dict(),
            "config_hash": self.chash,
            "plan_digest": self.plan.digest,
            "hashed_config": cfg.hashed_fields(),
            "versions": _versions(),
            "rounds": final["round"] + 1,
            "stop_reason": stop_reason,
            "surrogate_error": final["error"],
            "protection": protection,
            "counts": self.counts,
            "work_dir": layout.work,
            "history": [{"round": h["round"], "error": h["error"],
                         "probe_accuracy": h["probe"]["probe_accuracy"] if h.get("probe") else None}
                        for h in self.history],
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }
        # _SUCCESS.json is written last of all: its presence means the release is complete.
        fs.write_bytes(layout.success, json.dumps(success, indent=2, default=str).encode())
        if not cfg.keep_work:
            fs.remove(layout.work, recursive=True)
        if protection["holds"]:
            log.info("release complete: %d protected, %d rejected; probe %.1f%% <= threshold %.1f%% (chance %.1f%%)",
                     self.counts["protected"], self.counts["rejected"], 100 * protection["probe_accuracy"],
                     100 * protection["threshold"], 100 * protection["chance"])
            return RunResult(EXIT_OK, success)
        log.error("!!! PROTECTION DOES NOT HOLD: a fresh %s trained on the release reaches %.1f%% on clean held-out "
                  "images (threshold %.1f%%, chance %.1f%%). The release is written but is NOT protected.",
                  protection["arch"], 100 * protection["probe_accuracy"], 100 * protection["threshold"],
                  100 * protection["chance"])
        return RunResult(EXIT_UNPROTECTED, success)
