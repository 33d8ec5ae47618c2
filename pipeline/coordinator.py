"""The coordinator: freezes the plan, starts the worker pool, runs rounds until the stop rule, then the export.

A round is: (1) surrogate training, (2) the noise update of every shard, (3) the stop check: the surrogate's error
on the data as it will be released and, when that error is low enough, the protection probe. The coordinator holds
no image data: workers load shards, keep the noise state and write the release.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline import clusters, faults
from pipeline.config import ADDED_FIELDS, ProtectConfig, config_hash, differing_fields
from pipeline.executor import ray_pool
from pipeline.exits import EXIT_OK, EXIT_UNPROTECTED
from pipeline.inspection import verify
from pipeline.lease import Lease
from pipeline.plan import Plan, ShardReader, build_plan, expand_inputs, read_here
from pipeline.progress import Heartbeat, eta
from pipeline.schedule import assign_shards
from pipeline.stages.check import CheckStage
from pipeline.stages.export import ExportStage, merge_manifests
from pipeline.stages.noise import NoiseStage
from pipeline.stages.probe import ProbeStage
from pipeline.stages.train import TrainStage
from pipeline.storage import fs
from pipeline.storage.layout import PLAN_SHARDS, ROUND_DIR, Layout, check_locations, default_work_dir
from pipeline.storage.markers import DamagedUnit, commit, drop, load_checked, read_marker, read_record, write_marker
from pipeline.storage.shards import shard_id

log = logging.getLogger(__name__)

KEEP_ROUNDS = 2  # noise state and checkpoints of the last two rounds are kept; older ones are deleted


MAX_WORKER_REPLACEMENTS = 3


# Why a --labels cluster release is never reported protected (_SUCCESS.json's protection.why).
UNCERTIFIED_CLUSTERS = (
    "with --labels cluster the probe learns the clusters, not the classes a victim trains on, so "
    "it cannot tell whether the release protects (on MNIST-5k it read 12.6% while small-cnn "
    "victims trained with the true labels reached 94%)"
)
# Config fields that say where the originals and the noise state live: kept out of the public _SUCCESS.json.
PRIVATE_CONFIG = ("inputs", "work_dir", "ray_address")


class ConfigRefused(ValueError):
    """A different config against an existing output, or arguments that cannot run."""


@dataclass
class RunResult:
    exit_code: int
    success: dict | None


def _versions() -> dict:
    import ray

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


@dataclass
class Prepared:
    layout: Layout
    plan: Plan
    chash: str
    success: dict | None  # the run record of a complete release with this config, else None


def prepare_run(cfg: ProtectConfig, reader: ShardReader = read_here) -> Prepared:
    """Resolve paths, freeze (or reload) the plan (the shards not recorded yet read by ``reader``), check the config
    against an existing run. A complete release with this config gets nothing written (a rerun of a finished run
    leaves nothing behind)."""
    cfg.resolved()
    output = fs.strip_url(cfg.output)
    work = fs.strip_url(cfg.work_dir) if cfg.work_dir else default_work_dir(output)
    # Before anything is written (--overwrite's removal included): the originals must never be touched.
    input_shards = expand_inputs(cfg.inputs)
    check_locations(cfg.inputs, input_shards, output, work)
    layout = Layout(output, work)
    if cfg.overwrite:
        log.warning("--overwrite: removing the previous release in %s and the work dir's files in %s", output, work)
        previous_run = read_record(layout.run_record) or {}
        layout.remove_release([shard_id(u) for u in input_shards])
        layout.remove_work(created=bool(previous_run.get("work_dir_created")))
    record = read_record(layout.run_record)
    # Whether the work dir was there before this run (a work dir holding only an earlier attempt's plan records was
    # created by that attempt, killed before run.json recorded it).
    work_existed = bool(set(fs.listdir(work)) - {PLAN_SHARDS})
    plan = _load_plan(layout, record)
    if plan is None:
        # Each shard's reading is recorded in the work dir as it is done: a rerun after a kill reads no shard twice.
        # Not for a rerun of a finished release, which writes nothing.
        plan = build_plan(
            input_shards,
            cfg.num_classes,
            cfg.image_key,
            cfg.label_key,  # listed once, above
            cfg.labels,
            record_dir=None if fs.exists(layout.success) else layout.plan_shards,
            reader=reader,
        )
    if cfg.num_classes is None:
        cfg.num_classes = plan.num_classes
    cfg.label_names = list(plan.label_names) or None  # the workers map class names to ids with it
    digest = plan.digest
    chash = config_hash(cfg, digest)
    success = read_record(layout.success)
    previous = record or success
    if previous is not None and previous.get("config_hash") != chash:
        recorded = dict(previous.get("hashed_config") or {}, plan=previous.get("plan_digest"))
        current = dict(cfg.hashed_fields(), plan=digest)
        fields = differing_fields(recorded, current) or ["(input plan)"]
        # What the run was started with: a rerun with the same arguments differs too when a default changed since.
        started = ", ".join(
            f"{k}={recorded.get(k, ADDED_FIELDS.get(k))!r}" for k in fields if k not in ("plan", "(input plan)")
        )
        raise ConfigRefused(
            f"{output} belongs to a run with a different config (differs in: {', '.join(fields)}); "
            + (f"it was started with {started}: " if started else "")
            + "rerun with the arguments it was started with to resume, or pass --overwrite to start over"
        )
    complete = success is not None and success.get("config_hash") == chash
    if not complete and (record is None or record.get("plan_sha256") is None or not fs.exists(layout.plan)):
        created = (record or {}).get("work_dir_created", not work_existed)
        plan_bytes = plan.to_parquet()
        fs.write_bytes(layout.plan, plan_bytes)
        run = {
            "config": cfg.to_dict(),
            "hashed_config": cfg.hashed_fields(),
            "config_hash": chash,
            "plan_digest": digest,
            "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
            "work_dir_created": created,
            "created": time.time(),
        }
        fs.write_bytes(layout.run_record, json.dumps(run, indent=2, default=str).encode())
    return Prepared(layout, plan, chash, success if complete else None)


def _load_plan(layout: Layout, record: dict | None) -> Plan | None:
    """The frozen plan, checked against the sha256 in ``run.json``; None (rebuild it) when either is missing or
    they disagree."""
    if record is None or not record.get("plan_sha256"):
        return None
    try:
        data = fs.read_bytes(layout.plan)
    except FileNotFoundError:
        return None
    if hashlib.sha256(data).hexdigest() != record["plan_sha256"]:
        log.warning("%s does not match its sha256 in run.json: the plan is built again", layout.plan)
        return None
    return Plan.from_parquet(data)


def protect(cfg: ProtectConfig) -> RunResult:
    """Run (or resume) a protection; returns the exit status (0, 3, 4; see the CLI) and the ``_SUCCESS.json`` record."""
    t_start = time.perf_counter()
    # A large corpus is read for the plan by Ray tasks; the Ray they start (if any) is the run's.
    reader = ray_pool.PlanReader(cfg.ray_address)
    try:
        prepared = prepare_run(cfg, reader)
        layout, plan, chash = prepared.layout, prepared.plan, prepared.chash
        done = _finished_run(cfg, prepared) if prepared.success is not None else None
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


def _finished_run(cfg: ProtectConfig, prepared: Prepared) -> RunResult | None:
    """A rerun of a finished run: verify the release first. Intact: finish the clean-up a kill may have cut short
    and return. Damaged shards: drop their markers and return None (the run resumes from the kept state and
    rewrites them), or refuse when the state to rewrite them is gone."""
    layout, done = prepared.layout, prepared.success
    verdict = verify(layout.output, [s.id for s in prepared.plan.shards])
    if verdict.ok:
        log.info("release in %s is already complete and verifies", layout.output)
        _clean_up(cfg, layout)
        return RunResult(EXIT_OK if done["protection"]["holds"] else EXIT_UNPROTECTED, done)
    log.warning(
        "the finished release in %s does not verify (%d problem(s); first: %s)",
        layout.output,
        len(verdict.problems),
        verdict.problems[0],
    )
    if not verdict.bad_shards:
        # Only the merged manifest or the run record's counts are wrong: both are rebuilt from the shards.
        _rewrite_merged(layout, prepared.plan, done, cfg.manifest_source_hash)
        _clean_up(cfg, layout)
        return RunResult(EXIT_OK if done["protection"]["holds"] else EXIT_UNPROTECTED, done)
    final = done["rounds"] - 1
    try:
        Run.check_round_state(layout, prepared.chash, final, _noise_units(cfg, prepared.plan))
    except DamagedUnit as exc:
        bad = ", ".join(verdict.bad_shards[:5]) + (" ..." if len(verdict.bad_shards) > 5 else "")
        raise ConfigRefused(
            f"the release in {layout.output} is damaged (shards {bad}) and the noise state that could rewrite them is "
            f"gone ({exc.url.rsplit('/', 1)[-1]}: only --keep-work keeps it); restore those shards' files from a "
            "copy of the release, or rerun with --overwrite to protect the corpus again"
        ) from None
    log.warning(
        "rewriting %d damaged shard(s) from the kept state: %s", len(verdict.bad_shards), ", ".join(verdict.bad_shards)
    )
    fs.remove(layout.success)  # first: the release is not complete until the shards are rewritten
    drop(*[layout.shard_marker(s) for s in verdict.bad_shards])
    return None


def _rewrite_merged(layout: Layout, plan: Plan, success: dict, source_hash: bool) -> None:
    counts = merge_manifests(layout, plan, source_hash)
    fs.write_bytes(
        layout.success,
        json.dumps({**success, "counts": counts, "shards": len(plan.shards)}, indent=2, default=str).encode(),
    )
    log.warning("manifest.parquet and the counts in _SUCCESS.json rewritten from the shards' manifests")


def _noise_units(cfg: ProtectConfig, plan: Plan) -> list[str]:
    return ["_classes"] if cfg.mode == "classwise" else [s.id for s in plan.shards]


def _clean_up(cfg: ProtectConfig, layout: Layout) -> None:
    """Delete the work dir's files (the noise state can undo the protection) unless --keep-work. A kill during it
    is finished by the next rerun, which finds the release complete and comes here again."""
    if cfg.keep_work:
        return
    record = read_record(layout.run_record) or {}
    layout.remove_work(created=bool(record.get("work_dir_created")))


def _record_error(layout: Layout, exc: BaseException) -> None:
    try:
        fs.write_bytes(
            layout.last_error, json.dumps({"error": f"{type(exc).__name__}: {exc}", "time": time.time()}).encode()
        )
    except OSError:
        log.warning("could not record the error in the work dir")


class Run(TrainStage, NoiseStage, CheckStage, ProbeStage, ExportStage):
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

    # ---- workers ----------------------------------------------------------------------------------------------
    def start_workers(self) -> None:
        """Start the pool, share the shards out and load them (every worker streams its own shards in parallel)."""
        cfg, plan = self.cfg, self.plan
        n, gpus_each, cpus_each = self.pool.pool_size(cfg.workers, cfg.gpus_per_worker, cfg.cpus_per_worker)
        if n > len(plan.shards):
            log.warning(
                "%d workers asked for but the corpus has %d shard(s): starting %d",
                n,
                len(plan.shards),
                len(plan.shards),
            )
            n = len(plan.shards)
        self.workers = self.pool.start_workers(cfg.to_dict(), plan.num_classes, plan.channels, n, gpus_each, cpus_each)
        shares = assign_shards(plan.shards, n)
        self.owner = {s.id: i for i, share in enumerate(shares) for s in share}
        log.info("loading %d shard(s), %d samples, on %d worker(s)", len(plan.shards), plan.total_samples, n)
        self.heartbeat.phase("load")
        t0 = time.perf_counter()
        # Each worker streams its shards' results as it loads them: a progress line per shard, with the pace.
        streams = {
            w.load_shards_streamed.remote([(s.id, s.url) for s in share]): i
            for i, (w, share) in enumerate(zip(self.workers, shares))
        }
        results, samples = [], 0
        while streams:
            ready, _ = self.pool.wait(list(streams))
            for stream in ready:
                r = self.pool.next_of(stream)
                if r is None:
                    del streams[stream]
                    continue
                results.append(r)
                samples += r["accepted"] + r["rejected"]
                elapsed = time.perf_counter() - t0
                log.info(
                    "load: %d/%d shards loaded (%s on worker %d), %.0f images/s%s",
                    len(results),
                    len(plan.shards),
                    r["shard"],
                    streams[stream],
                    samples / max(elapsed, 1e-9),
                    eta(samples, plan.total_samples, elapsed),
                )
        seconds = time.perf_counter() - t0
        self.timings["load"] += seconds
        for r in results:
            if r["read_error"]:
                log.warning("shard %s: %s", r["shard"], r["read_error"])
        accepted = sum(r["accepted"] for r in results)
        log.info(
            "loaded %d shard(s) on %d worker(s): %d samples accepted, %d rejected, %.1f s (%.0f images/s)",
            len(results),
            n,
            accepted,
            sum(r["rejected"] for r in results),
            seconds,
            accepted / max(seconds, 1e-9),
        )
        if accepted == 0:
            raise ConfigRefused("no sample of the corpus can be protected (every sample was rejected)")
        # Every worker learns where its rows sit in the whole corpus (the plan's order): the pool then draws one
        # worker's batches (pipeline.worker.train_stage).
        counts = {r["shard"]: r["accepted"] for r in results}
        offsets, total = {}, 0
        for s in plan.shards:
            offsets[s.id] = total
            total += counts[s.id]
        self.pool.get_all([w.set_global_rows.remote(offsets, total) for w in self.workers])
        if cfg.labels == "cluster":
            self._cluster_labels()

    def _cluster_labels(self) -> None:
        """--labels cluster: every sample's label becomes its k-means cluster (``pipeline.clusters``), from the
        centroids this run committed, or from a k-means over the pool committed now."""
        layout = self.layout
        self.heartbeat.phase("cluster")
        try:
            centroids = clusters.from_bytes(load_checked(layout.clusters, layout.clusters_marker, self.chash))
            how = "the run's committed centroids"
        except DamagedUnit:
            t0 = time.perf_counter()
            workers = self.workers

            def lloyd_sums(centroids):  # the centroids go into the object store once, not once per worker
                ref = self.pool.put(centroids)
                return self.pool.get_all([w.cluster_sums.remote(ref) for w in workers])

            centroids, iterations = clusters.kmeans(
                lambda m: self.pool.get_all([w.cluster_candidates.remote(m) for w in workers]),
                lloyd_sums,
                self.plan.num_classes,
                self.cfg.seed,
            )
            commit(
                layout.clusters, clusters.to_bytes(centroids), layout.clusters_marker, self.chash, iterations=iterations
            )
            how = f"k-means, {iterations} iteration(s), {time.perf_counter() - t0:.1f} s"
        ref = self.pool.put(centroids)
        sizes = [sum(c) for c in zip(*self.pool.get_all([w.set_centroids.remote(ref) for w in self.workers]))]
        log.info("--labels cluster: %d groups (%s); sizes %s", len(sizes), how, sizes)

    def stop_workers(self) -> None:
        for w in self.workers:
            self.pool.kill(w)
        self.workers = []

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

    @staticmethod
    def check_round_state(layout: Layout, chash: str, r: int, units: list[str]) -> tuple[bytes, dict[str, bytes]]:
        """Round r's checkpoint and every noise unit's state, each checked against its marker's sha256;
        ``DamagedUnit`` names the first that is missing or damaged."""
        ckpt = load_checked(layout.checkpoint(r), layout.train_marker(r), chash)
        return ckpt, {u: load_checked(layout.noise_state(r, u), layout.noise_marker(r, u), chash) for u in units}

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
                ckpt, states = self.check_round_state(layout, self.chash, last, self._noise_units())
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
        return _noise_units(self.cfg, self.plan)

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
        cfg, layout = self.cfg, self.layout
        final = self.history[-1]
        stop_reason = "stop_rule" if final["stop"] else "max_rounds"
        protection = {
            k: final["probe"][k]
            for k in (
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
        }
        protection["probe_holds"] = protection["holds"]  # the plain probe's verdict: the stop rule's
        if self.battery is not None:
            # Protected only when the plain probe and every countermeasure of the battery hold.
            protection.update(
                holds=protection["holds"] and self.battery["holds"],
                countermeasures=self.battery["countermeasures"],
                worst_case=self.battery["worst_case"],
            )
        if cfg.labels == "cluster":
            # The probe learns the clusters, not the classes a victim trains on: its verdict cannot certify the
            # release (measured on MNIST-5k: the probe read 12.6%, victims trained with the true labels 94%).
            protection.update(holds=False, certified=False, why=UNCERTIFIED_CLUSTERS)
        if stop_reason == "max_rounds":
            log.warning(
                "!!! reached --max-rounds %d without meeting the stop rule (error %.4f, probe %.1f%% against "
                "threshold %.1f%%): released anyway",
                cfg.max_rounds,
                final["error"],
                100 * protection["probe_accuracy"],
                100 * protection["threshold"],
            )
        self.timings["total"] = time.perf_counter() - t_start
        success = {
            # Public: where the originals and the noise live stays in the work dir's run.json.
            "config": {k: v for k, v in cfg.to_dict().items() if k not in PRIVATE_CONFIG},
            "config_hash": self.chash,
            "plan_digest": self.plan.digest,
            "hashed_config": cfg.hashed_fields(),
            "versions": _versions(),
            "rounds": final["round"] + 1,
            "stop_reason": stop_reason,
            "surrogate_error": final["error"],
            "protection": protection,
            "counts": self.counts,
            "shards": len(self.plan.shards),
            "history": [
                {
                    "round": h["round"],
                    "error": h["error"],
                    "image_steps": h.get("image_steps", 0),
                    "probe_accuracy": h["probe"]["probe_accuracy"] if h.get("probe") else None,
                }
                for h in self.history
            ],
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
            # PGD image-steps actually taken (rounds done before a resume included): the work the release cost.
            "image_steps": sum(h.get("image_steps", 0) for h in self.history),
        }
        # _SUCCESS.json is written last of all: its presence means the release is complete.
        fs.write_bytes(layout.success, json.dumps(success, indent=2, default=str).encode())
        _clean_up(cfg, layout)
        if protection["holds"]:
            log.info(
                "release complete: %d protected, %d rejected; probe %.1f%% <= threshold %.1f%% (chance %.1f%%)",
                self.counts["protected"],
                self.counts["rejected"],
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
