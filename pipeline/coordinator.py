"""The coordinator: a short loop over the run's parts, each in its own module.

``pipeline.prepare`` freezes the plan and checks the config against what the output holds; ``Run`` starts the pool
and loads the shards (``pipeline.stages.load``), then runs rounds until the stop rule: (1) surrogate training, (2) the
noise update of every shard, (3) the stop check: the surrogate's error on the data as it will be released and, when
that error is low enough, the protection probe (``pipeline.stages``: one module a stage, holding its unit of done
and its commit); then the probe's countermeasure battery and the export; ``pipeline.outcome`` writes the record
and tells the verdict. The coordinator holds no image data: workers load shards, keep the noise state and write
the release.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from tqdm import tqdm

from pipeline import faults, outcome
from pipeline.config import ProtectConfig
from pipeline.executor import ray_pool
from pipeline.lease import Lease
from pipeline.outcome import RunResult
from pipeline.plan import Plan
from pipeline.prepare import check_round_state, clean_up, finished_run, noise_units, prepare_run
from pipeline.progress import Heartbeat
from pipeline.stages.check import CheckStage
from pipeline.stages.export import ExportStage
from pipeline.stages.load import LoadStage
from pipeline.stages.noise import NoiseStage
from pipeline.stages.probe import ProbeStage
from pipeline.stages.train import TrainStage
from pipeline.storage import fs
from pipeline.storage.layout import ROUND_DIR, Layout
from pipeline.storage.markers import DamagedUnit, drop, read_marker, read_record, write_marker

log = logging.getLogger(__name__)

KEEP_ROUNDS = 2  # noise state and checkpoints of the last two rounds are kept; older ones are deleted
MAX_WORKER_REPLACEMENTS = 3


def protect(cfg: ProtectConfig) -> RunResult:
    """Run (or resume) a protection; returns the exit status (0, 3, 4; see the CLI) and the ``_SUCCESS.json`` record."""
    t_start = time.perf_counter()
    # A large corpus is read for the plan by Ray tasks; the Ray they start (if any) is the run's.
    reader = ray_pool.PlanReader(cfg.ray_address)
    try:
        prepared = prepare_run(cfg, reader)
        layout, plan, chash = prepared.layout, prepared.plan, prepared.chash
        done = finished_run(cfg, prepared) if prepared.success is not None else None
        if done is None:
            lease = Lease(layout.lease)
            lease.acquire()
    except BaseException:
        ray_pool.shutdown(reader.started)
        raise
    if done is not None:
        ray_pool.shutdown(reader.started)
        return done
    started = ray_pool.connect(cfg.ray_address) or reader.started
    run = Run(cfg, layout, plan, chash)
    try:
        # A line at least every 30 s in every phase, even inside one long unit of work (pipeline.progress).
        with run.heartbeat:
            for replacement in range(MAX_WORKER_REPLACEMENTS + 1):
                try:
                    run.start_workers()
                    run.rounds()
                    run.probe_battery()
                    run.export()
                    break
                except ray_pool.WorkerDied as exc:
                    if replacement == MAX_WORKER_REPLACEMENTS:
                        raise
                    # The pool's process group dies with any of its workers: restart the whole pool.
                    log.warning("worker died (%s); restarting the pool and resuming from the last committed unit", exc)
                    run.stop_workers()
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            _record_error(layout, exc)
        raise
    finally:
        run.stop_workers()
        ray_pool.shutdown(started)
        lease.release()
    return run.finish(t_start)


def _record_error(layout: Layout, exc: BaseException) -> None:
    try:
        fs.write_bytes(
            layout.last_error, json.dumps({"error": f"{type(exc).__name__}: {exc}", "time": time.time()}).encode()
        )
    except OSError:
        log.warning("could not record the error in the work dir")


class Run(LoadStage, TrainStage, NoiseStage, CheckStage, ProbeStage, ExportStage):
    """One coordinator's pass over a run: resume from the markers, rounds, export, the run record. Each stage's side
    of it (its unit of done, its commit, how it spreads over the workers) is in its module, ``pipeline.stages``.
    ``executor``: what runs the workers (``pipeline.executor``: Ray actors, or one worker in this process)."""

    def __init__(self, cfg: ProtectConfig, layout: Layout, plan: Plan, chash: str, executor=ray_pool) -> None:
        self.cfg, self.layout, self.plan, self.chash = cfg, layout, plan, chash
        self.pool = executor
        self.plan_order = [s.id for s in plan.shards]  # the probe assembles every worker's data in this order
        self.timings: dict[str, float] = dict.fromkeys(("load", "train", "noise", "check", "probe", "export"), 0.0)
        self.workers: list = []
        self.owner: dict[str, int] = {}  # shard id -> index of the worker that holds it
        self.history: list[dict] = []
        self.battery: dict | None = None  # the probe's countermeasure battery on the final release
        self.counts = {"input": 0, "protected": 0, "rejected": 0}
        self.heartbeat = Heartbeat(logging.getLogger("pipeline"))  # started by protect(); phases named as they start

    def _attempt(self, unit: str, r: int | None = None, shard: str | None = None) -> None:
        """Log that a unit of work starts (the attempt log lets tests prove nothing finished is redone)."""
        self.heartbeat.phase(" ".join(p for p in (f"round {r}" if r is not None else "", unit, shard or "") if p))
        faults.at_unit("coordinator", unit, r, shard)
        name = f"{unit}-r{r if r is not None else ''}-{shard or ''}-{time.time_ns()}.json"
        fs.write_bytes(
            fs.join(self.layout.attempts, name),
            json.dumps({"unit": unit, "round": r, "shard": shard, "pid": os.getpid()}).encode(),
        )

    # ---- rounds -----------------------------------------------------------------------------------------------
    def _finished_rounds(self) -> list[dict]:
        history, r = [], 0
        while True:
            marker = read_marker(self.layout.round_marker(r))
            if marker is None or marker.get("config_hash") != self.chash:
                return history
            history.append(marker)
            r += 1

    def _send_checkpoint(self, ckpt: bytes) -> None:
        """Every worker loads the surrogate checkpoint (the same weights everywhere)."""
        ref = self.pool.put(ckpt)
        self.pool.get_all([w.restore.remote(ref) for w in self.workers])

    def _drop_rounds_from(self, r: int) -> None:
        """Round r and every later round are no longer finished: their records go (their checked units stay)."""
        later = [int(n.split("-")[1]) for n in fs.listdir(self.layout.work) if ROUND_DIR.fullmatch(n)]
        drop(*[self.layout.round_marker(k) for k in sorted(set(later) | {r}) if k >= r])

    def _dropped(self, exc: DamagedUnit, r: int) -> None:
        """A damaged unit of round r: its marker goes, so the unit is recomputed (never loaded)."""
        layout = self.layout
        marker = {layout.checkpoint(r): layout.train_marker(r)}.get(exc.url)
        if marker is None:
            marker = exc.url[: -len(".pt")] + ".json"  # a noise state's marker sits beside it
        log.warning("%s; recomputing it", exc)
        drop(marker)

    def rounds(self) -> None:
        cfg, layout = self.cfg, self.layout
        self.history = self._finished_rounds()
        clean_ref = (read_record(layout.probe_record) or {}).get("probe_clean_accuracy")
        # Resume from the last finished round whose state checks out; a damaged unit sends the run back a round
        # (its marker dropped, recomputed from the round before), as far back as round 0 from scratch. Nothing
        # reaches the workers before the whole round has checked out.
        while self.history:
            last = len(self.history) - 1
            try:
                ckpt, states = check_round_state(layout, self.chash, last, self._noise_units())
            except DamagedUnit as exc:
                self._dropped(exc, last)
                self._drop_rounds_from(last)
                self.history.pop()
                continue
            log.info("resuming after round %d", last)
            self._send_checkpoint(ckpt)
            self._send_noise(states)
            break
        last = len(self.history) - 1
        if self.history and self.history[-1]["stop"]:
            return
        bar = tqdm(
            range(last + 1, cfg.max_rounds),
            desc="rounds",
            unit="round",
            file=sys.stderr,
            initial=last + 1,
            total=cfg.max_rounds,
            disable=not sys.stderr.isatty(),
        )
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
        return noise_units(self.cfg, self.plan)

    def _round(self, r: int, clean_ref: float | None, final: bool, probe: bool = True) -> dict:
        """Round r's stages and its record (the round marker); ``probe=False`` leaves the probe out (bench)."""
        cfg, layout = self.cfg, self.layout
        record: dict = {"round": r, "mode": cfg.mode, "workers": len(self.workers)}
        seconds: dict[str, float] = {}
        # The round's stages, each in its module (pipeline.stages): its work, its unit of done, its commit.
        t0 = time.perf_counter()
        train = self._train_stage(r)
        if train is not None:
            record["train"] = train
        seconds["train"] = time.perf_counter() - t0
        log.info(
            "round %d train: %d steps, loss %s, %.1f s",
            r,
            cfg.train_steps,
            f"{train['loss']:.4f}" if train else "(done before)",
            seconds["train"],
        )
        t0 = time.perf_counter()
        record["image_steps"] = self._noise_stage(r)
        seconds["noise"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        record["error"] = self._check_stage(r)
        seconds["check"] = time.perf_counter() - t0
        # The probe when the error rule holds (and after the last round, whatever the error).
        t0 = time.perf_counter()
        record["probe"] = self._probe(clean_ref) if probe and (record["error"] <= cfg.stop_error or final) else None
        seconds["probe"] = time.perf_counter() - t0
        record["stop"] = bool(record["error"] <= cfg.stop_error and record["probe"] and record["probe"]["holds"])
        record["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        for k, v in seconds.items():
            self.timings[k] += v
        probe_txt = ""
        if record["probe"]:
            p = record["probe"]
            probe_txt = (
                f"; probe {p['arch']} {100 * p['probe_accuracy']:.1f}% on clean held-out "
                f"(threshold {100 * p['threshold']:.1f}%, {'holds' if p['holds'] else 'does NOT hold'})"
            )
            if p.get("probe_best_class"):
                best = p["probe_best_class"]
                probe_txt += f", best class {best['class']} (F1 {best['f1']:.2f}, {100 * best['accuracy']:.1f}%)"
        log.info(
            "round %d: surrogate error on released data %.4f (stop at %.4f)%s; stages %s",
            r,
            record["error"],
            cfg.stop_error,
            probe_txt,
            ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()),
        )
        write_marker(layout.round_marker(r), self.chash, **record)
        old = r - KEEP_ROUNDS
        if old >= 0:  # keep the last two rounds' noise state and checkpoints; the round records stay
            layout.remove_round_state(old)
        return record

    # ---- export -----------------------------------------------------------------------------------------------

    def finish(self, t_start: float) -> RunResult:
        """``_SUCCESS.json``, written last of all (its presence means the release is complete), the clean-up and the
        verdict."""
        self.timings["total"] = time.perf_counter() - t_start
        cfg = self.cfg
        success = outcome.success_record(
            cfg.to_dict(),
            cfg.hashed_fields(),
            self.chash,
            self.plan.digest,
            len(self.plan.shards),
            self.history,
            self.battery,
            self.counts,
            self.timings,
        )
        outcome.write_success(self.layout, success)
        clean_up(cfg, self.layout)
        return outcome.report(success)
