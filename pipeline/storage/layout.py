"""Where everything lives: the release (OUTPUT) and the work dir (WORK), as the README lays them out.

OUTPUT holds only protected shards, their manifests and markers, the merged manifest and ``_SUCCESS.json``.
WORK holds the noise state and surrogate checkpoints, which can undo the protection: it is never inside OUTPUT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from braceexpand import braceexpand

from pipeline.storage import fs


def default_work_dir(output: str) -> str:
    out = fs.strip_url(output)
    if "://" in out and out.split("://", 1)[1].count("/") == 0:
        raise ValueError(f"output {output} is a bucket root: pass --work-dir (the work dir must not be inside OUTPUT)")
    return out + ".work"


def check_work_dir_outside(output: str, work: str) -> None:
    out, wk = fs.location(output), fs.location(work)
    if fs.overlaps(out, wk):
        raise ValueError(f"work dir {work} overlaps the output {output}: noise state must never land in the release")


def check_locations(inputs: list[str], input_shards: list[str], output: str, work: str) -> None:
    """Refuse (ValueError, before anything is written) any overlap of the inputs, OUTPUT and WORK.

    Compared as resolved locations (real paths; bucket and normalised prefix), so another spelling of the same
    place (``D/x/../out``, a relative path, a symlink) is the same place. An input folder must not equal or contain
    OUTPUT or WORK (a rerun would read the release as input, a clean-up would delete originals), and neither may
    equal or contain an input shard (the export would overwrite an original).
    """
    check_work_dir_outside(output, work)
    for flag, url in (("--output", output), ("--work-dir", work)):
        if fs.is_file(url):
            raise ValueError(f"{flag} {url} is a file, not a folder")
    targets = {"--output": fs.location(output), "--work-dir": fs.location(work)}
    folders = [item for spec in inputs for item in braceexpand(spec) if not item.endswith(".tar")]
    places = [(url, "overlaps the input folder") for url in folders] + [
        (url, "contains the input shard") for url in input_shards
    ]
    for url, what in places:
        where = fs.location(url)
        for flag, target in targets.items():
            if fs.overlaps(where, target):
                raise ValueError(f"{flag} {what} {url}: the originals must never be touched")


ROUND_DIR = re.compile(r"round-[0-9]{4}")
TEMP_PREFIX = ".tmp-"  # fs.write_bytes's temp files: a killed write leaves one behind
PLAN_SHARDS = "plan-shards"  # the work dir's folder of per-shard plan records


@dataclass(frozen=True)
class Layout:
    output: str
    work: str

    # OUTPUT
    def shard_tar(self, shard: str) -> str:
        return fs.join(self.output, f"{shard}.tar")

    def shard_manifest(self, shard: str) -> str:
        return fs.join(self.output, f"{shard}.parquet")

    def shard_marker(self, shard: str) -> str:
        return fs.join(self.output, f"{shard}_stats.json")

    @property
    def manifest(self) -> str:
        return fs.join(self.output, "manifest.parquet")

    @property
    def success(self) -> str:
        return fs.join(self.output, "_SUCCESS.json")

    # WORK
    @property
    def run_record(self) -> str:
        return fs.join(self.work, "run.json")

    @property
    def plan(self) -> str:
        return fs.join(self.work, "plan.parquet")

    @property
    def plan_shards(self) -> str:
        """Each shard's part of the plan, recorded as it is read (``pipeline.plan.build_plan``): a rerun reads no
        shard twice."""
        return fs.join(self.work, PLAN_SHARDS)

    @property
    def probe_record(self) -> str:
        return fs.join(self.work, "probe_clean.json")

    @property
    def battery_record(self) -> str:
        """The probe's countermeasure battery on the final release (a resumed export does not train it again)."""
        return fs.join(self.work, "probe_battery.json")

    @property
    def clusters(self) -> str:
        """--labels cluster: the centroids that give every sample its pseudo-label (a resumed run reuses them)."""
        return fs.join(self.work, "clusters.pt")

    @property
    def clusters_marker(self) -> str:
        return fs.join(self.work, "clusters.json")

    def round_dir(self, r: int) -> str:
        return fs.join(self.work, f"round-{r:04d}")

    @property
    def lease(self) -> str:
        return fs.join(self.work, "lease.json")

    @property
    def last_error(self) -> str:
        return fs.join(self.work, "last_error.json")

    @property
    def attempts(self) -> str:
        return fs.join(self.work, "attempts")

    def checkpoint(self, r: int) -> str:
        """The surrogate after round r's training stage (weights, optimiser, RNG); the noise stage leaves it as is."""
        return fs.join(self.round_dir(r), "surrogate.pt")

    def train_marker(self, r: int) -> str:
        return fs.join(self.round_dir(r), "train.json")

    def noise_state(self, r: int, shard: str) -> str:
        return fs.join(self.round_dir(r), "noise", f"{shard}.pt")

    def noise_marker(self, r: int, shard: str) -> str:
        return fs.join(self.round_dir(r), "noise", f"{shard}.json")

    def round_marker(self, r: int) -> str:
        return fs.join(self.round_dir(r), "round.json")

    # Clean-up: only files a run wrote, by name; only folders it created.
    def round_files(self, r: int) -> list[str]:
        """Round r's checkpoint and noise state (what can undo the protection), with the noise markers: every file
        of the round's ``noise`` folder is a run's (state, marker, or a killed write's temp file)."""
        noise = fs.join(self.round_dir(r), "noise")
        names = [n for n in fs.listdir(noise) if n.endswith((".pt", ".json")) or n.startswith(TEMP_PREFIX)]
        return [self.checkpoint(r)] + [fs.join(noise, n) for n in names]

    def remove_round_state(self, r: int) -> None:
        for url in self.round_files(r):
            fs.remove(url)
        fs.remove_empty_dir(fs.join(self.round_dir(r), "noise"))

    def remove_work(self, created: bool) -> None:
        """Delete every file of the work dir that a run writes, by name, the run record last; then the folders
        runs create, and the work dir itself only when the run created it and nothing else is left in it."""
        names = fs.listdir(self.work)
        for name in names:
            if not ROUND_DIR.fullmatch(name):
                continue
            r = int(name.split("-")[1])
            self.remove_round_state(r)
            folder = self.round_dir(r)
            for url in (self.train_marker(r), self.round_marker(r)):
                fs.remove(url)
            for n in fs.listdir(folder):
                if n.startswith(TEMP_PREFIX):
                    fs.remove(fs.join(folder, n))
            fs.remove_empty_dir(folder)
        for n in fs.listdir(self.attempts):
            if ATTEMPT_NAME.fullmatch(n) or n.startswith(TEMP_PREFIX):
                fs.remove(fs.join(self.attempts, n))
        fs.remove_empty_dir(self.attempts)
        for n in fs.listdir(self.plan_shards):
            if n.endswith(".json") or n.startswith(TEMP_PREFIX):
                fs.remove(fs.join(self.plan_shards, n))
        fs.remove_empty_dir(self.plan_shards)
        for url in (
            self.plan,
            self.probe_record,
            self.battery_record,
            self.clusters,
            self.clusters_marker,
            self.last_error,
            self.lease,
        ):
            fs.remove(url)
        for n in names:
            if n.startswith(TEMP_PREFIX):
                fs.remove(fs.join(self.work, n))
        fs.remove(self.run_record)  # last: it records whether the run created the work dir
        if created:
            fs.remove_empty_dir(self.work)

    def remove_release(self, shard_ids: list[str]) -> None:
        """--overwrite: delete the release files of these shards and of every shard with a marker in OUTPUT, the
        merged manifest and ``_SUCCESS.json`` (first: the release is no longer complete); nothing else."""
        fs.remove(self.success)
        names = fs.listdir(self.output)
        ids = set(shard_ids) | {n[: -len("_stats.json")] for n in names if n.endswith("_stats.json")}
        for shard in sorted(ids):
            for url in (self.shard_marker(shard), self.shard_tar(shard), self.shard_manifest(shard)):
                fs.remove(url)
        fs.remove(self.manifest)
        for n in names:
            if n.startswith(TEMP_PREFIX):
                fs.remove(fs.join(self.output, n))


# The attempt log's names (coordinator._attempt): unit, round, shard, a nanosecond clock.
ATTEMPT_NAME = re.compile(r"(train|noise|check|export|probe)-r[0-9]*-.*-[0-9]+\.json")
