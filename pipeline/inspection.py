"""``status`` and ``verify``: what a run has done and what is left, and whether a release holds what it claims.

Both read only the storage (OUTPUT and WORK); neither starts Ray nor changes anything.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ops.choices import ENCODE_FORMATS, LOSSY_FORMATS
from pipeline.plan import METADATA_THREADS, Plan
from pipeline.samples import REPEATED_KEY_ERROR, ordered_map
from pipeline.storage import fs, manifest
from pipeline.storage.layout import Layout, default_work_dir
from pipeline.storage.markers import read_marker
from pipeline.storage.shards import plain_tar_members, split_member_name

PARALLEL_FROM = 64  # shards to check before verify is worth starting processes (each imports the pipeline)
SHARDS_A_TASK = 16  # shards a process checks at a time


def _json(url: str) -> dict | None:
    try:
        return json.loads(fs.read_bytes(url))
    except (FileNotFoundError, ValueError):
        return None


def status(output: str, work_dir: str | None = None) -> dict:
    """Rounds, stages, shards done / failed / left, the last error on released data, and whether it is complete."""
    output = fs.strip_url(output)
    layout = Layout(output, fs.strip_url(work_dir) if work_dir else default_work_dir(output))
    success = _json(layout.success)
    run = _json(layout.run_record)
    if run is None and success is None:
        return {"output": output, "state": "not started", "complete": False}
    chash = (run or success)["config_hash"]
    out: dict = {"output": output, "work_dir": layout.work, "config_hash": chash, "complete": success is not None}
    if success is not None:
        out.update(
            state="complete",
            rounds=success["rounds"],
            stop_reason=success["stop_reason"],
            surrogate_error=success["surrogate_error"],
            protection=success["protection"],
            counts=success["counts"],
        )
        return out
    plan = Plan.from_parquet(fs.read_bytes(layout.plan)) if fs.exists(layout.plan) else None
    shards = [s.id for s in plan.shards] if plan else []
    rounds = []
    r = 0
    while (m := read_marker(layout.round_marker(r))) is not None and m.get("config_hash") == chash:
        rounds.append(m)
        r += 1
    stopped = bool(rounds and rounds[-1].get("stop"))
    max_rounds = int(run["config"].get("max_rounds", 0))
    out["rounds_done"] = len(rounds)
    out.update(_pace(rounds, plan.total_samples if plan else 0, max_rounds))
    out["last_error_on_released_data"] = rounds[-1]["error"] if rounds else None
    out["last_probe"] = rounds[-1].get("probe") if rounds else None
    # One read of each shard's marker (``_markers``): what is exported and what failed.
    markers = _markers([layout.shard_marker(s) for s in shards])
    exported = [s for s, m in zip(shards, markers) if m.get("config_hash") == chash]
    if stopped or (max_rounds and len(rounds) >= max_rounds):
        out["stage"] = "export"
        out["shards"] = {"total": len(shards), "done": len(exported), "left": len(shards) - len(exported)}
    else:
        current = len(rounds)
        trained = (read_marker(layout.train_marker(current)) or {}).get("config_hash") == chash
        units = ["_classes"] if run["config"]["mode"] == "classwise" else shards
        noise_markers = _markers([layout.noise_marker(current, u) for u in units])
        noised = [u for u, m in zip(units, noise_markers) if m.get("config_hash") == chash]
        out["round"] = current
        out["stage"] = "noise" if trained else "train"
        out["shards"] = {"total": len(units), "done": len(noised), "left": len(units) - len(noised)}
    out["shards"]["failed"] = sum(1 for m in markers if m.get("read_error"))
    out["state"] = "in progress"
    out["last_run_error"] = (_json(layout.last_error) or {}).get("error")
    return out


def _markers(urls: list[str]) -> list[dict]:
    """The markers at ``urls`` in order ({} where there is none): on object storage many requests in flight (the
    plan's metadata threads), on a local disk one at a time (threads there only contend for the GIL: 10,000 local
    markers took 3.0 s on 16 threads, 1.9 s read twice on one)."""
    threads = METADATA_THREADS if urls and not fs.is_local(urls[0]) else 1
    return list(ordered_map(lambda u: read_marker(u) or {}, urls, threads))


@dataclass
class Verdict:
    """What ``verify`` found: ``problems`` (one line each), the shards whose files are damaged or missing, and a
    summary of counts."""

    problems: list[str]
    bad_shards: list[str]
    summary: dict

    @property
    def ok(self) -> bool:
        return not self.problems


def _pace(rounds: list[dict], samples: int, max_rounds: int) -> dict:
    """How fast the finished rounds went: seconds per round, the noise stage's images/s, and the time left if the
    run goes on to --max-rounds (an upper bound: the stop rule may end it sooner)."""
    seconds = [sum((m.get("seconds") or {}).values()) for m in rounds]
    if not seconds:
        return {}
    per_round = sum(seconds) / len(seconds)
    noise = (rounds[-1].get("seconds") or {}).get("noise")
    return {
        "seconds_per_round": round(per_round, 1),
        "noise_images_per_second": round(samples / noise, 1) if noise else None,
        "eta_seconds_at_most": round(per_round * max(0, max_rounds - len(rounds))),
    }


def verify(output: str, shard_ids: list[str] | None = None) -> Verdict:
    """Check every shard against its marker and manifest (sizes, hashes, keys, the L-inf bound, counts) and every
    row of ``manifest.parquet`` against its shard's manifest. ``shard_ids`` (a run's plan) names the shards the
    release must hold; without it, the shards are those that have a marker or rows in ``manifest.parquet``."""
    output = fs.strip_url(output)
    layout = Layout(output, output + ".work")  # only OUTPUT is read
    success = _json(layout.success)
    if success is None:
        return Verdict([f"{layout.success} missing or unreadable: the release is not complete"], [], {})
    problems: list[str] = []
    bound, ext = release_rule(success["config"])
    names = fs.listdir(output)
    try:
        merged = pq.ParquetFile(io.BytesIO(fs.read_bytes(layout.manifest)))
        # The shards the merged manifest names, only when the caller did not say which the release holds.
        merged_shards = (
            set(pc.unique(merged.read(columns=["shard"]).column("shard")).to_pylist()) if shard_ids is None else set()
        )
    except FileNotFoundError:
        merged, merged_shards = None, set()
        problems.append("manifest.parquet missing")
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        merged, merged_shards = None, set()
        problems.append(f"manifest.parquet unreadable ({type(exc).__name__})")
    if shard_ids is None:
        shard_ids = sorted({n[: -len("_stats.json")] for n in names if n.endswith("_stats.json")} | merged_shards)
    allowed = {"manifest.parquet", "_SUCCESS.json"} | {
        f"{s}{x}" for s in shard_ids for x in (".tar", ".parquet", "_stats.json")
    }
    problems += [f"unexpected object in the release: {n}" for n in names if n not in allowed]
    totals = {"input": 0, "protected": 0, "rejected": 0}
    # The merged manifest is compared with each shard's rows as the shards are checked, a batch of its rows at a
    # time: a million rows are never held at once.
    merge_check = _MergedCheck(merged) if merged is not None else None
    bad = []
    for shard, (found, rows, counts) in _each_shard(layout, shard_ids, success["config_hash"], bound, ext):
        for k, v in counts.items():
            totals[k] += v
        if found:
            bad.append(shard)
            problems += found
        if merge_check is not None:
            merge_check.expect(rows)
    if "shards" in success and success["shards"] != len(shard_ids):
        problems.append(f"_SUCCESS.json says {success['shards']} shards, the release holds {len(shard_ids)}")
    if merge_check is not None:
        problems += merge_check.finish()
    if success["counts"] != totals:
        problems.append(f"_SUCCESS.json counts {success['counts']} differ from the shards' {totals}")
    return Verdict(problems, bad, {"shards": len(shard_ids), **totals, "linf_bound": bound})


def release_rule(config: dict) -> tuple[int | None, str]:
    """What every released image of a run with this config must satisfy: its bound on the manifest's ``linf`` in
    uint8 levels (eps; None for a lossy encoding, whose codec error is part of ``linf``) and its member extension."""
    fmt = config.get("encode_format") or "png"  # runs from before --encode-format released PNG
    return (round(float(config["eps"]) * 255) if fmt not in LOSSY_FORMATS else None), ENCODE_FORMATS[fmt]


def verify_shards(output: str, shard_ids: list[str], chash: str, config: dict) -> list[str]:
    """The shards among ``shard_ids`` whose release files do not match their markers and manifests."""
    layout = Layout(fs.strip_url(output), "")
    bound, ext = release_rule(config)
    return [s for s, (found, _, _) in _each_shard(layout, shard_ids, chash, bound, ext) if found]


def _each_shard(
    layout: Layout, shard_ids: list[str], chash: str, bound: int | None, ext: str, processes: int | None = None
) -> Iterator[tuple]:
    """(shard, ``_verify_shard``'s result) for every shard, in order. From ``PARALLEL_FROM`` shards on, the shards are
    checked on ``processes`` processes (default: one a CPU, at most 16), a chunk of shards each, a bounded number of
    chunks ahead of the caller; fewer in this process. (Processes, not threads: on 10,000 local shards on 2 cores
    eight threads took 112 s against 101 s with one, the checks' Python work holding the GIL.)"""
    processes = min(16, os.cpu_count() or 1) if processes is None else processes
    if processes < 2 or len(shard_ids) < PARALLEL_FROM:
        yield from ((s, _verify_shard(layout, s, chash, bound, ext)) for s in shard_ids)
        return
    chunks = iter([shard_ids[i : i + SHARDS_A_TASK] for i in range(0, len(shard_ids), SHARDS_A_TASK)])
    # spawn, not fork: the coordinator that calls this has Ray's threads running.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        ahead = collections.deque(
            (chunk, pool.submit(_verify_chunk, layout, chunk, chash, bound, ext))
            for chunk in itertools.islice(chunks, 2 * processes)
        )
        while ahead:
            chunk, future = ahead.popleft()
            for more in itertools.islice(chunks, 1):
                ahead.append((more, pool.submit(_verify_chunk, layout, more, chash, bound, ext)))
            yield from zip(chunk, future.result())


def _verify_chunk(layout: Layout, shards: list[str], chash: str, bound: int | None, ext: str) -> list[tuple]:
    return [_verify_shard(layout, s, chash, bound, ext) for s in shards]


class _MergedCheck:
    """Every row of the merged manifest equals its shard's row, field for field, in the shards' order: ``expect``
    each shard's rows (an Arrow table) in turn, then ``finish``. The merged rows are read a batch at a time and
    compared a shard's slice at a time as Arrow tables; only a slice that differs is compared row by row, to name
    the row and its fields."""

    def __init__(self, merged: pq.ParquetFile) -> None:
        self.total = merged.metadata.num_rows
        self.batches = merged.iter_batches(batch_size=65536)
        self.pending: pa.Table | None = None  # merged rows read and not yet compared
        self.index = 0  # rows compared
        self.expected = 0
        self.problem: str | None = None
        self.unreadable: str | None = None  # a row group that does not decode (its footer did)

    def expect(self, rows: pa.Table | None) -> None:
        n = 0 if rows is None else rows.num_rows
        self.expected += n
        if self.problem is not None or n == 0 or self.index >= self.total:
            return
        got = self._take(min(n, self.total - self.index))
        if got is None:
            return
        want = rows.slice(0, got.num_rows)
        if got.equals(want):
            self.index += got.num_rows
            return
        for a, b in zip(got.to_pylist(), want.to_pylist()):
            if a != b:
                fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                self.problem = (
                    f"manifest.parquet row {self.index} (key {b.get('key')!r}, shard "
                    f"{b.get('shard')}) differs from its shard's manifest in: {', '.join(fields)}"
                )
                return
            self.index += 1

    def _take(self, n: int) -> pa.Table | None:
        """The next ``n`` merged rows (None, with the problem recorded, when a row group does not decode)."""
        try:
            while self.pending is None or self.pending.num_rows < n:
                batch = pa.Table.from_batches([next(self.batches)])
                self.pending = batch if self.pending is None else pa.concat_tables([self.pending, batch])
        except Exception as exc:  # noqa: BLE001 - a damaged row group: pyarrow raises several kinds
            self.problem = self.unreadable = f"manifest.parquet unreadable ({type(exc).__name__})"
            return None
        got, self.pending = self.pending.slice(0, n), self.pending.slice(n)
        return got

    def finish(self) -> list[str]:
        if self.unreadable:
            return [self.unreadable]
        if self.total != self.expected:
            return [f"manifest.parquet has {self.total} rows, the shards {self.expected}"]
        return [self.problem] if self.problem else []


def _tar_members(tar_bytes: bytes) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, a function that returns its data) of every member of a shard's tar: read directly when the tar is a plain
    one (``plain_tar_members``), else by ``tarfile`` (which raises ``TarError`` for a damaged one)."""
    plain = plain_tar_members(tar_bytes)
    if plain is not None:
        view = memoryview(tar_bytes)
        yield from ((name, lambda o=offset, n=size: bytes(view[o : o + n])) for name, offset, size in plain)
        return
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for info in tar:
            yield info.name, lambda i=info: tar.extractfile(i).read()


def _verify_shard(
    layout: Layout, shard: str, chash: str, bound: int | None, ext: str
) -> tuple[list[str], pa.Table | None, dict]:
    """One shard's problems, its manifest's rows (an Arrow table) once its manifest matches its marker (else None),
    and its counts once its tar was read (else none)."""
    problems = []
    marker = read_marker(layout.shard_marker(shard)) or {}
    if marker.get("config_hash") != chash:
        return [f"{shard}: marker missing or from another run"], None, {}
    try:
        tar_bytes = fs.read_bytes(layout.shard_tar(shard))
        man_bytes = fs.read_bytes(layout.shard_manifest(shard))
    except FileNotFoundError as exc:
        return [f"{shard}: {exc}"], None, {}
    if len(tar_bytes) != marker.get("tar_bytes") or hashlib.sha256(tar_bytes).hexdigest() != marker.get("tar_sha256"):
        problems.append(f"{shard}.tar does not match its marker (size or sha256)")
    if hashlib.sha256(man_bytes).hexdigest() != marker.get("manifest_sha256"):
        return problems + [f"{shard}.parquet does not match its marker"], None, {}
    table = manifest.from_parquet(man_bytes)
    rows = table.to_pylist()
    protected = {r["key"]: r for r in rows if r["status"] == "protected"}
    # A key may repeat only as a rejected repeat of an earlier sample; otherwise one row per key.
    first_rows = [r["key"] for r in rows if not (r["status"] == "rejected" and r["error"] == REPEATED_KEY_ERROR)]
    if len(first_rows) != len(set(first_rows)):
        problems.append(f"{shard}: a key has more than one manifest row")
    if any(r["shard"] != shard for r in rows):
        problems.append(f"{shard}: a manifest row names another shard")
    images: dict[str, bytes] = {}
    try:
        for name, data in _tar_members(tar_bytes):
            key, member = split_member_name(name)
            if name.startswith("/") or ".." in name:
                problems.append(f"{shard}: member name {name!r} is absolute or holds '..'")
            if member == ext:
                if key in images:
                    problems.append(f"{shard}: {key}.{ext} appears twice")
                images[key] = data()
    except tarfile.TarError as exc:
        return problems + [f"{shard}.tar unreadable: {exc}"], table, {}
    if set(images) != set(protected):
        problems.append(
            f"{shard}: tar keys and protected manifest rows differ "
            f"({len(set(images) - set(protected))} extra, {len(set(protected) - set(images))} missing)"
        )
    for key, data in images.items():
        row = protected.get(key)
        if row is None:
            continue
        if hashlib.sha256(data).hexdigest() != row["output_sha256"] or row["output_member"] != f"{key}.{ext}":
            problems.append(f"{shard}: {key}.{ext} does not match its manifest row (hash or member)")
        if row["linf"] is None or (bound is not None and row["linf"] > bound):
            problems.append(f"{shard}: {key} moved {row['linf']} levels, over the bound {bound}")
    counts = {"input": len(rows), "protected": len(protected), "rejected": len(rows) - len(protected)}
    for k, v in counts.items():
        if marker.get(k) != v:
            problems.append(f"{shard}: marker says {k}={marker.get(k)}, manifest {v}")
    return problems, table, counts
