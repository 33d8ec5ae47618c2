"""Before the rounds: the inputs expanded and checked against the output, the plan frozen (or reloaded), the config
checked against what the output and the work dir hold, and a rerun of a finished run (verified, repaired or left
alone)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

from pipeline.config import ADDED_FIELDS, ProtectConfig, config_hash, differing_fields
from pipeline.inspection import verify
from pipeline.outcome import RunResult, exit_status, write_success
from pipeline.plan import Plan, ShardReader, build_plan, expand_inputs, read_here
from pipeline.stages.export import merge_manifests
from pipeline.storage import fs
from pipeline.storage.layout import PLAN_SHARDS, Layout, check_locations, default_work_dir
from pipeline.storage.markers import DamagedUnit, drop, load_checked, read_record
from pipeline.storage.shards import shard_id

log = logging.getLogger(__name__)


class ConfigRefused(ValueError):
    """A different config against an existing output, or arguments that cannot run."""


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


def finished_run(cfg: ProtectConfig, prepared: Prepared) -> RunResult | None:
    """A rerun of a finished run: verify the release first. Intact: finish the clean-up a kill may have cut short
    and return. Damaged shards: drop their markers and return None (the run resumes from the kept state and
    rewrites them), or refuse when the state to rewrite them is gone."""
    layout, done = prepared.layout, prepared.success
    verdict = verify(layout.output, [s.id for s in prepared.plan.shards])
    if verdict.ok:
        log.info("release in %s is already complete and verifies", layout.output)
        clean_up(cfg, layout)
        return RunResult(exit_status(done), done)
    log.warning(
        "the finished release in %s does not verify (%d problem(s); first: %s)",
        layout.output,
        len(verdict.problems),
        verdict.problems[0],
    )
    if not verdict.bad_shards:
        # Only the merged manifest or the run record's counts are wrong: both are rebuilt from the shards.
        _rewrite_merged(layout, prepared.plan, done, cfg.manifest_source_hash)
        clean_up(cfg, layout)
        return RunResult(exit_status(done), done)
    final = done["rounds"] - 1
    try:
        check_round_state(layout, prepared.chash, final, noise_units(cfg, prepared.plan))
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
    write_success(layout, {**success, "counts": counts, "shards": len(plan.shards)})
    log.warning("manifest.parquet and the counts in _SUCCESS.json rewritten from the shards' manifests")


def noise_units(cfg: ProtectConfig, plan: Plan) -> list[str]:
    return ["_classes"] if cfg.mode == "classwise" else [s.id for s in plan.shards]


def clean_up(cfg: ProtectConfig, layout: Layout) -> None:
    """Delete the work dir's files (the noise state can undo the protection) unless --keep-work. A kill during it
    is finished by the next rerun, which finds the release complete and comes here again."""
    if cfg.keep_work:
        return
    record = read_record(layout.run_record) or {}
    layout.remove_work(created=bool(record.get("work_dir_created")))


def check_round_state(layout: Layout, chash: str, r: int, units: list[str]) -> tuple[bytes, dict[str, bytes]]:
    """Round r's checkpoint and every noise unit's state, each checked against its marker's sha256;
    ``DamagedUnit`` names the first that is missing or damaged."""
    ckpt = load_checked(layout.checkpoint(r), layout.train_marker(r), chash)
    return ckpt, {u: load_checked(layout.noise_state(r, u), layout.noise_marker(r, u), chash) for u in units}
