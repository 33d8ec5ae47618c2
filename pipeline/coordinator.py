"""The coordinator: freezes the plan, starts the worker pool, runs rounds until the stop rule, then the export.

A round is: (1) surrogate training, (2) the noise update of every shard, (3) the stop check: the surrogate's error
on the data as it will be released and, when that error is low enough, the protection probe. The coordinator holds
no image data: workers load shards, keep the noise state and write the release.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import platform
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline import clusters, faults, pool
from pipeline.config import PROBE_MARGIN, ProtectConfig, config_hash, differing_fields, probe_battery
from pipeline.inspection import verify, verify_shards
from pipeline.lease import Lease
from pipeline.plan import Plan, build_plan, expand_inputs
from pipeline.probe import judge, judge_battery
from pipeline.progress import Heartbeat, eta
from pipeline.schedule import NoiseQueue, assign_shards
from pipeline.storage import fs, manifest
from pipeline.storage.layout import ROUND_DIR, Layout, check_locations, default_work_dir
from pipeline.storage.markers import DamagedUnit, commit, drop, is_done, load_checked, read_marker, write_marker
from pipeline.storage.shards import shard_id

log = logging.getLogger(__name__)

EXIT_OK, EXIT_BAD_ARGS, EXIT_INCOMPLETE, EXIT_UNPROTECTED = 0, 2, 3, 4
KEEP_ROUNDS = 2  # noise state and checkpoints of the last two rounds are kept; older ones are deleted


MAX_WORKER_REPLACEMENTS = 3


# Why a --labels cluster release is never reported protected (_SUCCESS.json's protection.why).
UNCERTIFIED_CLUSTERS = ("with --labels cluster the probe learns the clusters, not the classes a victim trains on, so "
                        "it cannot tell whether the release protects (on MNIST-5k it read 12.6% while small-cnn "
                        "victims trained with the true labels reached 94%)")
# Config fields that say where the originals and the noise state live: kept out of the public _SUCCESS.json.
PRIVATE_CONFIG = ("inputs", "work_dir", "ray_address")


class ConfigRefused(ValueError):
    """A different config against an existing output, or arguments that cannot run."""


@dataclass
class RunResult:
    exit_code: int
    success: dict | None


def _read_json(url: str) -> dict | None:
    """A JSON record, or None when it is missing or damaged (a torn write or changed bytes: never trusted)."""
    try:
        record = json.loads(fs.read_bytes(url))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        log.warning("%s is damaged: ignored", url)
        return None
    return record if isinstance(record, dict) else None


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


@dataclass
class Prepared:
    layout: Layout
    plan: Plan
    chash: str
    success: dict | None  # the run record of a complete release with this config, else None


def prepare_run(cfg: ProtectConfig) -> Prepared:
    """Resolve paths, freeze (or reload) the plan, check the config against an existing run. A complete release
    with this config gets nothing written (a rerun of a finished run leaves nothing behind)."""
    cfg.resolved()
    output = fs.strip_url(cfg.output)
    work = fs.strip_url(cfg.work_dir) if cfg.work_dir else default_work_dir(output)
    # Before anything is written (--overwrite's removal included): the originals must never be touched.
    input_shards = expand_inputs(cfg.inputs)
    check_locations(cfg.inputs, input_shards, output, work)
    layout = Layout(output, work)
    if cfg.overwrite:
        log.warning("--overwrite: removing the previous release in %s and the work dir's files in %s", output, work)
        previous_run = _read_json(layout.run_record) or {}
        layout.remove_release([shard_id(u) for u in input_shards])
        layout.remove_work(created=bool(previous_run.get("work_dir_created")))
    record = _read_json(layout.run_record)
    plan = _load_plan(layout, record)
    if plan is None:
        plan = build_plan(input_shards, cfg.num_classes, cfg.image_key, cfg.label_key,  # listed once, above
                          cfg.labels)
    if cfg.num_classes is None:
        cfg.num_classes = plan.num_classes
    cfg.label_names = list(plan.label_names) or None  # the workers map class names to ids with it
    digest = plan.digest
    chash = config_hash(cfg, digest)
    success = _read_json(layout.success)
    previous = record or success
    if previous is not None and previous.get("config_hash") != chash:
        recorded = dict(previous.get("hashed_config") or {}, plan=previous.get("plan_digest"))
        current = dict(cfg.hashed_fields(), plan=digest)
        fields = differing_fields(recorded, current) or ["(input plan)"]
        raise ConfigRefused(
            f"{output} belongs to a run with a different config (differs in: {', '.join(fields)}); "
            "rerun with the same arguments to resume, or pass --overwrite to start over"
        )
    complete = success is not None and success.get("config_hash") == chash
    if not complete and (record is None or record.get("plan_sha256") is None or not fs.exists(layout.plan)):
        created = (record or {}).get("work_dir_created", not fs.exists(work))
        plan_bytes = plan.to_parquet()
        fs.write_bytes(layout.plan, plan_bytes)
        run = {"config": cfg.to_dict(), "hashed_config": cfg.hashed_fields(), "config_hash": chash,
               "plan_digest": digest, "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
               "work_dir_created": created, "created": time.time()}
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
    prepared = prepare_run(cfg)
    layout, plan, chash = prepared.layout, prepared.plan, prepared.chash
    if prepared.success is not None:
        done = _finished_run(cfg, prepared)
        if done is not None:
            return done
    lease = Lease(layout.lease)
    lease.acquire()
    started = pool.connect(cfg.ray_address)
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
                except pool.WorkerDied as exc:
                    if replacement == MAX_WORKER_REPLACEMENTS:
                        raise
                    # The pool's process group dies with any of its workers: restart the whole pool.
                    log.warning("worker died (%s); restarting the pool and resuming from the last committed unit",
                                exc)
                    run.stop_workers()
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            _record_error(layout, exc)
        raise
    finally:
        run.stop_workers()
        pool.shutdown(started)
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
    log.warning("the finished release in %s does not verify (%d problem(s); first: %s)", layout.output,
                len(verdict.problems), verdict.problems[0])
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
            "copy of the release, or rerun with --overwrite to protect the corpus again") from None
    log.warning("rewriting %d damaged shard(s) from the kept state: %s", len(verdict.bad_shards),
                ", ".join(verdict.bad_shards))
    fs.remove(layout.success)  # first: the release is not complete until the shards are rewritten
    drop(*[layout.shard_marker(s) for s in verdict.bad_shards])
    return None


def _rewrite_merged(layout: Layout, plan: Plan, success: dict, source_hash: bool) -> None:
    counts = _merge_manifests(layout, plan, source_hash)
    fs.write_bytes(layout.success, json.dumps({**success, "counts": counts, "shards": len(plan.shards)}, indent=2,
                                              default=str).encode())
    log.warning("manifest.parquet and the counts in _SUCCESS.json rewritten from the shards' manifests")


def _merge_manifests(layout: Layout, plan: Plan, source_hash: bool) -> dict:
    """``manifest.parquet`` from the shards' manifests, streamed a shard at a time; returns the counts the shards'
    markers hold."""
    counts = {"input": 0, "protected": 0, "rejected": 0}
    for shard in plan.shards:
        stats = read_marker(layout.shard_marker(shard.id))
        for k in counts:
            counts[k] += stats[k]
    with fs.writing(layout.manifest) as out:
        manifest.merge((fs.read_bytes(layout.shard_manifest(s.id)) for s in plan.shards), out, source_hash)
    return counts


def _noise_units(cfg: ProtectConfig, plan: Plan) -> list[str]:
    return ["_classes"] if cfg.mode == "classwise" else [s.id for s in plan.shards]


def _clean_up(cfg: ProtectConfig, layout: Layout) -> None:
    """Delete the work dir's files (the noise state can undo the protection) unless --keep-work. A kill during it
    is finished by the next rerun, which finds the release complete and comes here again."""
    if cfg.keep_work:
        return
    record = _read_json(layout.run_record) or {}
    layout.remove_work(created=bool(record.get("work_dir_created")))


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
        n, gpus_each, cpus_each = pool.pool_size(cfg.workers, cfg.gpus_per_worker, cfg.cpus_per_worker)
        if n > len(plan.shards):
            log.warning("%d workers asked for but the corpus has %d shard(s): starting %d", n, len(plan.shards),
                        len(plan.shards))
            n = len(plan.shards)
        self.workers = pool.start_workers(cfg.to_dict(), plan.num_classes, plan.channels, n, gpus_each, cpus_each)
        shares = assign_shards(plan.shards, n)
        self.owner = {s.id: i for i, share in enumerate(shares) for s in share}
        log.info("loading %d shard(s), %d samples, on %d worker(s)", len(plan.shards), plan.total_samples, n)
        self.heartbeat.phase("load")
        t0 = time.perf_counter()
        # Each worker streams its shards' results as it loads them: a progress line per shard, with the pace.
        streams = {w.load_shards_streamed.remote([(s.id, s.url) for s in share]): i
                   for i, (w, share) in enumerate(zip(self.workers, shares))}
        results, samples = [], 0
        while streams:
            ready, _ = pool.wait(list(streams))
            for stream in ready:
                r = pool.next_of(stream)
                if r is None:
                    del streams[stream]
                    continue
                results.append(r)
                samples += r["accepted"] + r["rejected"]
                elapsed = time.perf_counter() - t0
                log.info("load: %d/%d shards loaded (%s on worker %d), %.0f images/s%s", len(results),
                         len(plan.shards), r["shard"], streams[stream], samples / max(elapsed, 1e-9),
                         eta(samples, plan.total_samples, elapsed))
        seconds = time.perf_counter() - t0
        self.timings["load"] += seconds
        for r in results:
            if r["read_error"]:
                log.warning("shard %s: %s", r["shard"], r["read_error"])
        accepted = sum(r["accepted"] for r in results)
        log.info("loaded %d shard(s) on %d worker(s): %d samples accepted, %d rejected, %.1f s (%.0f images/s)",
                 len(results), n, accepted, sum(r["rejected"] for r in results), seconds, accepted / max(seconds, 1e-9))
        if accepted == 0:
            raise ConfigRefused("no sample of the corpus can be protected (every sample was rejected)")
        # Every worker learns where its rows sit in the whole corpus (the plan's order): the pool then draws one
        # worker's batches (pipeline.worker.train_stage).
        counts = {r["shard"]: r["accepted"] for r in results}
        offsets, total = {}, 0
        for s in plan.shards:
            offsets[s.id] = total
            total += counts[s.id]
        pool.get_all([w.set_global_rows.remote(offsets, total) for w in self.workers])
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
                ref = pool.put(centroids)
                return pool.get_all([w.cluster_sums.remote(ref) for w in workers])

            centroids, iterations = clusters.kmeans(
                lambda m: pool.get_all([w.cluster_candidates.remote(m) for w in workers]), lloyd_sums,
                self.plan.num_classes, self.cfg.seed)
            commit(layout.clusters, clusters.to_bytes(centroids), layout.clusters_marker, self.chash,
                   iterations=iterations)
            how = f"k-means, {iterations} iteration(s), {time.perf_counter() - t0:.1f} s"
        ref = pool.put(centroids)
        sizes = [sum(c) for c in zip(*pool.get_all([w.set_centroids.remote(ref) for w in self.workers]))]
        log.info("--labels cluster: %d groups (%s); sizes %s", len(sizes), how, sizes)


    def stop_workers(self) -> None:
        for w in self.workers:
            pool.kill(w)
        self.workers = []

    def _attempt(self, unit: str, r: int | None = None, shard: str | None = None) -> None:
        """Log that a unit of work starts (the attempt log lets tests prove nothing finished is redone)."""
        self.heartbeat.phase(" ".join(p for p in (f"round {r}" if r is not None else "", unit, shard or "") if p))
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

    @staticmethod
    def check_round_state(layout: Layout, chash: str, r: int, units: list[str]) -> tuple[bytes, dict[str, bytes]]:
        """Round r's checkpoint and every noise unit's state, each checked against its marker's sha256;
        ``DamagedUnit`` names the first that is missing or damaged."""
        ckpt = load_checked(layout.checkpoint(r), layout.train_marker(r), chash)
        return ckpt, {u: load_checked(layout.noise_state(r, u), layout.noise_marker(r, u), chash) for u in units}

    def _send_checkpoint(self, ckpt: bytes) -> None:
        """Every worker loads the surrogate checkpoint (the same weights everywhere)."""
        ref = pool.put(ckpt)
        pool.get_all([w.restore.remote(ref) for w in self.workers])

    def _send_noise(self, states: dict[str, bytes]) -> None:
        """Checked noise state back into the workers: a shard's to its owner, the class noise to all."""
        refs = []
        for unit, data in states.items():
            state = pool.put(data)
            if unit == "_classes":
                refs += [w.load_noise_state.remote(None, state) for w in self.workers]
            else:
                refs.append(self.workers[self.owner[unit]].load_noise_state.remote(unit, state))
        pool.get_all(refs)

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
        clean_ref = (_read_json(layout.probe_record) or {}).get("probe_clean_accuracy")
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
        bar = tqdm(range(last + 1, cfg.max_rounds), desc="rounds", unit="round", file=sys.stderr,
                   initial=last + 1, total=cfg.max_rounds, disable=not sys.stderr.isatty())
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

    def _checked_units(self, r: int, units: list[str]) -> dict[str, bytes]:
        """The state of round r's units that are done and check out; a damaged one's marker is dropped."""
        states = {}
        for unit in units:
            if not is_done(self.layout.noise_marker(r, unit), self.chash):
                continue
            try:
                states[unit] = load_checked(self.layout.noise_state(r, unit), self.layout.noise_marker(r, unit),
                                            self.chash)
            except DamagedUnit as exc:
                self._dropped(exc, r)
        return states

    def _round(self, r: int, clean_ref: float | None, final: bool) -> dict:
        cfg, layout = self.cfg, self.layout
        record: dict = {"round": r, "mode": cfg.mode, "workers": len(self.workers)}
        seconds: dict[str, float] = {}
        # Stage 1: training, data-parallel over the pool. Its checkpoint is the unit's output, so a resumed round
        # never retrains.
        t0 = time.perf_counter()
        trained = None
        if is_done(layout.train_marker(r), self.chash):
            try:
                trained = load_checked(layout.checkpoint(r), layout.train_marker(r), self.chash)
            except DamagedUnit as exc:
                self._dropped(exc, r)
        if trained is not None:
            self._send_checkpoint(trained)
        else:
            self._attempt("train", r)
            results = pool.get_all([w.train_stage.remote(r) for w in self.workers])
            record["train"] = {"loss": sum(x["loss"] for x in results) / len(results),
                               "seconds": max(x["seconds"] for x in results)}
            commit(layout.checkpoint(r), pool.get(self.workers[0].checkpoint.remote()), layout.train_marker(r),
                   self.chash, **record["train"])
        seconds["train"] = time.perf_counter() - t0
        log.info("round %d train: %d steps, loss %s, %.1f s", r, cfg.train_steps,
                 f"{record['train']['loss']:.4f}" if "train" in record else "(done before)", seconds["train"])
        # Stage 2: noise, one unit per shard (class-wise: one unit for the class noise).
        t0 = time.perf_counter()
        record["image_steps"] = self._noise_stage(r)
        seconds["noise"] = time.perf_counter() - t0
        # Stage 3: the stop check on the data as it will be released, and the probe when the error rule holds.
        self._attempt("check", r)
        t0 = time.perf_counter()
        errors = pool.get_all([w.released_error.remote() for w in self.workers])
        record["error"] = round(sum(e["wrong"] for e in errors) / max(sum(e["total"] for e in errors), 1), 6)
        seconds["check"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        record["probe"] = self._probe(clean_ref) if record["error"] <= cfg.stop_error or final else None
        seconds["probe"] = time.perf_counter() - t0
        record["stop"] = bool(record["error"] <= cfg.stop_error and record["probe"] and record["probe"]["holds"])
        record["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        for k, v in seconds.items():
            self.timings[k] += v
        probe_txt = ""
        if record["probe"]:
            p = record["probe"]
            probe_txt = (f"; probe {p['arch']} {100 * p['probe_accuracy']:.1f}% on clean held-out "
                         f"(threshold {100 * p['threshold']:.1f}%, {'holds' if p['holds'] else 'does NOT hold'})")
        log.info("round %d: surrogate error on released data %.4f (stop at %.4f)%s; stages %s", r, record["error"],
                 cfg.stop_error, probe_txt, ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
        write_marker(layout.round_marker(r), self.chash, **record)
        old = r - KEEP_ROUNDS
        if old >= 0:  # keep the last two rounds' noise state and checkpoints; the round records stay
            layout.remove_round_state(old)
        return record

    def _noise_stage(self, r: int) -> int:
        """Round r's noise update of every shard; returns the image-steps it took. Units done before (a resumed
        stage) are loaded once they check out against their markers; a damaged one is recomputed."""
        done = self._checked_units(r, self._noise_units())
        self._send_noise(done)
        if self.cfg.mode == "classwise":
            if done:
                return 0
            self._attempt("noise", r, "_classes")
            image_steps = self._run_noise_queue(r, [s.id for s in self.plan.shards], commit=False)
            # Every worker summed its shards' class updates; the class noise moves by the sum over the pool.
            parts = pool.get_all([w.class_update_sums.remote() for w in self.workers])
            sums = pool.put(sum(p[0] for p in parts))
            counts = pool.put(sum(p[1] for p in parts))
            pool.get_all([w.apply_class_update.remote(sums, counts) for w in self.workers])
            self._commit_noise(r, "_classes", 0)
            return image_steps
        return self._run_noise_queue(r, [s.id for s in self.plan.shards if s.id not in done], commit=True)

    def _run_noise_queue(self, r: int, shard_ids: list[str], commit: bool) -> int:
        """Hand the shards to idle workers, own shards first, then other workers' unstarted ones (see schedule.py).

        Sample-wise (``commit``), each shard's noise state is committed as soon as it is done, and a shard computed
        by a guest worker goes back to its owner. The commit (storage write, read-back, marker) runs on a coordinator
        thread while the worker already computes its next shard: at 224 px a shard's state is ~150 kB an image, and
        writing it must not idle the GPU."""
        cfg = self.cfg
        url = {s.id: s.url for s in self.plan.shards}
        queue = NoiseQueue({i: [s for s in shard_ids if self.owner[s] == i] for i in range(len(self.workers))})
        idle = list(range(len(self.workers)))
        running: dict = {}
        to_owners = []
        commits: list[Future] = []
        image_steps = samples = done = 0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(2, len(self.workers)), thread_name_prefix="commit") as writers:
            while len(queue) or running:
                for i in list(idle):
                    job = queue.next_for(i)
                    if job is None:
                        continue
                    idle.remove(i)
                    shard, owner = job
                    if commit:
                        self._attempt("noise", r, shard)
                    if owner == i:
                        ref = self.workers[i].noise_stage.remote(shard, r)
                    else:
                        state = self._guest_state(r, shard, owner) if cfg.mode == "samplewise" else None
                        ref = self.workers[i].noise_stage_guest.remote(shard, r, url[shard], state)
                    running[ref] = (i, shard, owner)
                ready, _ = pool.wait(list(running))
                for ref in ready:
                    i, shard, owner = running.pop(ref)
                    result = pool.get(ref)
                    if commit:
                        # Asked for before the worker's next shard (an actor runs its calls in order), written while
                        # that shard computes; a guest's result goes to the owner as the same object, not via here.
                        state_ref = self.workers[i].noise_state.remote(shard)
                        commits.append(writers.submit(self._commit_state, r, shard, state_ref))
                        if owner != i:
                            to_owners.append(self.workers[owner].load_noise_state.remote(shard, state_ref))
                    idle.append(i)
                    image_steps += result["image_steps"]
                    samples += result["samples"]
                    done += 1
                    elapsed = time.perf_counter() - t0
                    log.info("round %d noise: %d/%d shards done (%s on worker %d%s), %.0f images/s%s", r, done,
                             len(shard_ids), shard, i, f", owner {owner}" if owner != i else "",
                             samples / max(elapsed, 1e-9), eta(done, len(shard_ids), elapsed))
            for f in commits:
                f.result()  # a failed write fails the stage, as it did inline
        pool.get_all(to_owners)
        return image_steps

    def _guest_state(self, r: int, shard: str, owner: int):
        """The noise a guest starts a shard's round r from: round r-1's committed state, checked against its marker;
        when it does not check out, the owner's copy in memory (it waits for the owner's current shard)."""
        if r == 0:
            return None
        try:
            return pool.put(load_checked(self.layout.noise_state(r - 1, shard), self.layout.noise_marker(r - 1, shard),
                                         self.chash))
        except DamagedUnit as exc:
            log.warning("%s; the guest takes the owner's copy", exc)
            return self.workers[owner].noise_state.remote(shard)

    def _commit_noise(self, r: int, unit: str, worker: int) -> bytes:
        """Noise state first, verified; its marker last. Returns the state."""
        shard = None if unit == "_classes" else unit
        return self._commit_state(r, unit, self.workers[worker].noise_state.remote(shard))

    def _commit_state(self, r: int, unit: str, state_ref) -> bytes:
        state = pool.get(state_ref)
        commit(self.layout.noise_state(r, unit), state, self.layout.noise_marker(r, unit), self.chash)
        return state

    def _probe(self, clean_ref: float | None) -> dict:
        t0 = time.perf_counter()
        cfg = self.cfg
        self.heartbeat.phase("probe")
        # The probe trains on its sample of the release (--probe-samples): workers hand their share of it to the one
        # that trains (object refs, not via the coordinator). The clean-trained reference, needed once per run,
        # trains on a second worker at the same time when there is one.
        parts = self._probe_parts()
        released = self.workers[0].probe_score.remote("released", *parts, order=self.plan_order)
        if clean_ref is None:
            clean = self.workers[1 % len(self.workers)].probe_score.remote("clean", *parts, order=self.plan_order)
            clean_ref = round(pool.get(clean)["accuracy"], 4)  # as the round records keep it: resumed == not
            fs.write_bytes(self.layout.probe_record, json.dumps(
                {"config_hash": self.chash, "probe_clean_accuracy": clean_ref}).encode())
        probe = judge(pool.get(released), clean_ref, arch=cfg.probe_arch, steps=cfg.probe_steps,
                      threshold=cfg.probe_threshold, margin=PROBE_MARGIN)
        log.info("probe: %.1f s", time.perf_counter() - t0)
        return probe

    def _probe_parts(self) -> list:
        """Every worker's share of the probe's sample: ``--probe-samples`` of the plan's samples, by key hash."""
        fraction = min(1.0, self.cfg.probe_samples / max(1, self.plan.total_samples))
        return [w.probe_data.remote(fraction) for w in self.workers]

    def probe_battery(self) -> None:
        """The probe's countermeasure battery on the final release: the plain probe early-stopped, and each of
        --probe-countermeasures (final and early-stopped), spread over the workers. Judged once, after the rounds
        (the stop rule uses the plain probe, which costs one training); its record in the work dir is reused by a
        resumed run."""
        names = probe_battery(self.cfg.probe_countermeasures)
        if not names:
            return
        names = ["none"] + [n for n in names if n != "none"]
        final = self.history[-1]
        record = _read_json(self.layout.battery_record)
        if record and record.get("config_hash") == self.chash and record.get("round") == final["round"]:
            self.battery = record["battery"]
            return
        t0 = time.perf_counter()
        probe = final["probe"]
        # The plain probe early-stopped is the final round's probe itself (same training, scored every epoch).
        plain = ([{"countermeasure": "none", "accuracy": probe["probe_accuracy"], "seconds": 0.0,
                   "early_stopped_accuracy": probe["probe_early_stopped_accuracy"],
                   "best_epoch": probe["probe_best_epoch"]}] if probe.get("probe_best_epoch") else [])
        names = names[len(plain):]
        self.heartbeat.phase(f"probe battery ({', '.join(names)})")
        parts = self._probe_parts() if names else []
        refs = [self.workers[i % len(self.workers)].probe_score.remote("released", *parts, countermeasure=name,
                                                                       order=self.plan_order)
                for i, name in enumerate(names)]
        self.battery = judge_battery(probe, plain + pool.get_all(refs))
        seconds = time.perf_counter() - t0
        self.timings["probe"] += seconds
        fs.write_bytes(self.layout.battery_record, json.dumps(
            {"config_hash": self.chash, "round": final["round"], "battery": self.battery}).encode())
        for name, c in self.battery["countermeasures"].items():
            log.info("probe battery: %s: %.1f%% final, %.1f%% early-stopped (epoch %d) on clean held-out (threshold "
                     "%.1f%%): %s", name, 100 * c["accuracy"], 100 * c["early_stopped_accuracy"], c["best_epoch"],
                     100 * final["probe"]["threshold"], "holds" if c["holds"] else "does NOT hold")
        log.info("probe battery: %.1f s", seconds)

    # ---- export -----------------------------------------------------------------------------------------------
    def export(self) -> None:
        """Every worker writes the release of the shards it owns, one at a time, the workers in parallel; the merged
        manifest last. (One export in flight per worker: an attempt is logged when its work starts, not queued.)"""
        t0 = time.perf_counter()
        layout = self.layout
        todo = {i: collections.deque() for i in range(len(self.workers))}
        # Shards released by an earlier coordinator are checked against their markers first: one changed or lost
        # since then is released again (the state to do so is here).
        earlier = [s.id for s in self.plan.shards if is_done(layout.shard_marker(s.id), self.chash)]
        damaged = verify_shards(layout.output, earlier, self.chash, self.cfg.to_dict())
        if damaged:
            log.warning("released shard(s) changed since they were written, released again: %s", ", ".join(damaged))
            drop(*[layout.shard_marker(s) for s in damaged])
        for shard in self.plan.shards:
            if not is_done(layout.shard_marker(shard.id), self.chash):
                todo[self.owner[shard.id]].append(shard.id)
        total, done = sum(len(q) for q in todo.values()), 0
        running: dict = {}
        while any(todo.values()) or running:
            busy = {w for w, _ in running.values()}
            for i, queue in todo.items():
                if queue and i not in busy:
                    shard = queue.popleft()
                    self._attempt("export", None, shard)
                    ref = self.workers[i].export_shard.remote(shard, layout.output, layout.work, self.chash)
                    running[ref] = (i, shard)
            ready, _ = pool.wait(list(running))
            for ref in ready:
                _, shard = running.pop(ref)
                stats = pool.get(ref)
                done += 1
                log.info("export: %d/%d shards written (%s: %d protected, %d rejected)%s", done, total, shard,
                         stats["protected"], stats["rejected"], eta(done, total, time.perf_counter() - t0))
        self.counts = _merge_manifests(layout, self.plan, self.cfg.manifest_source_hash)
        self.timings["export"] += time.perf_counter() - t0

    def finish(self, t_start: float) -> RunResult:
        cfg, layout = self.cfg, self.layout
        final = self.history[-1]
        stop_reason = "stop_rule" if final["stop"] else "max_rounds"
        protection = {k: final["probe"][k] for k in ("holds", "probe_accuracy", "probe_clean_accuracy", "chance",
                                                      "threshold", "arch", "steps", "train_samples", "test_samples")}
        protection["probe_holds"] = protection["holds"]  # the plain probe's verdict: the stop rule's
        if self.battery is not None:
            # Protected only when the plain probe and every countermeasure of the battery hold.
            protection.update(holds=protection["holds"] and self.battery["holds"],
                              countermeasures=self.battery["countermeasures"], worst_case=self.battery["worst_case"])
        if cfg.labels == "cluster":
            # The probe learns the clusters, not the classes a victim trains on: its verdict cannot certify the
            # release (measured on MNIST-5k: the probe read 12.6%, victims trained with the true labels 94%).
            protection.update(holds=False, certified=False, why=UNCERTIFIED_CLUSTERS)
        if stop_reason == "max_rounds":
            log.warning("!!! reached --max-rounds %d without meeting the stop rule (error %.4f, probe %.1f%% against "
                        "threshold %.1f%%): released anyway", cfg.max_rounds, final["error"],
                        100 * protection["probe_accuracy"], 100 * protection["threshold"])
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
            "history": [{"round": h["round"], "error": h["error"], "image_steps": h.get("image_steps", 0),
                         "probe_accuracy": h["probe"]["probe_accuracy"] if h.get("probe") else None}
                        for h in self.history],
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
            # PGD image-steps actually taken (rounds done before a resume included): the work the release cost.
            "image_steps": sum(h.get("image_steps", 0) for h in self.history),
        }
        # _SUCCESS.json is written last of all: its presence means the release is complete.
        fs.write_bytes(layout.success, json.dumps(success, indent=2, default=str).encode())
        _clean_up(cfg, layout)
        if protection["holds"]:
            log.info("release complete: %d protected, %d rejected; probe %.1f%% <= threshold %.1f%% (chance %.1f%%)",
                     self.counts["protected"], self.counts["rejected"], 100 * protection["probe_accuracy"],
                     100 * protection["threshold"], 100 * protection["chance"])
            return RunResult(EXIT_OK, success)
        if protection.get("certified") is False:
            log.error("!!! PROTECTION NOT CERTIFIED: %s. The release is written; measure it with `unlearnable "
                      "evaluate` on labelled data before publishing.", protection["why"])
            return RunResult(EXIT_UNPROTECTED, success)
        worst = protection.get("worst_case") or {"countermeasure": "none", "accuracy": protection["probe_accuracy"]}
        log.error("!!! PROTECTION DOES NOT HOLD: a fresh %s trained on the release reaches %.1f%% on clean held-out "
                  "images (under %s; threshold %.1f%%, chance %.1f%%). The release is written but is NOT protected.",
                  protection["arch"], 100 * max(worst["accuracy"], protection["probe_accuracy"]),
                  worst["countermeasure"], 100 * protection["threshold"], 100 * protection["chance"])
        return RunResult(EXIT_UNPROTECTED, success)
