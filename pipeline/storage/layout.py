"""Where everything lives: the release (OUTPUT) and the work dir (WORK), as DESIGN.md lays them out.

OUTPUT holds only protected shards, their manifests and markers, the merged manifest and ``_SUCCESS.json``.
WORK holds the noise state and surrogate checkpoints, which can undo the protection: it is never inside OUTPUT.
"""

from __future__ import annotations

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
    targets = {"--output": fs.location(output), "--work-dir": fs.location(work)}
    folders = [item for spec in inputs for item in braceexpand(spec) if not item.endswith(".tar")]
    places = [(url, "overlaps the input folder") for url in folders] + [(url, "contains the input shard")
                                                                         for url in input_shards]
    for url, what in places:
        where = fs.location(url)
        for flag, target in targets.items():
            if fs.overlaps(where, target):
                raise ValueError(f"{flag} {what} {url}: the originals must never be touched")


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
    def probe_record(self) -> str:
        return fs.join(self.work, "probe_clean.json")

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
