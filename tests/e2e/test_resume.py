"""Resume after SIGKILL of the coordinator, replacement of a dead worker, config refusal, status and verify.

Every run here is ``unlearnable protect`` in its own process on real Ray: most join a running Ray cluster (as a job
on a cluster does); the reference, the dead worker and the random kills start a local Ray of their own. Kill points
come from the fault hook (``UNLEARNABLE_FAULT``), so they land exactly inside a training stage, a noise stage and the
export.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli

# Two rounds always (stop-error 0 is never met before the last round); small work so that many runs fit. The digits
# are 28 px and the working resolution 24, so that the stop check needs the images at native size: the reference
# keeps them in memory (--cache auto), and the resumed runs below find them on local disk or decode them again
# (--cache disk, --cache none), releasing the same bytes.
ARGS = [
    "--resolution",
    "24",
    "--pgd-steps",
    "2",
    "--step-size",
    "2/255",
    "--train-steps",
    "3",
    "--batch-size",
    "64",
    "--probe-steps",
    "20",
    "--probe-arch",
    "small-cnn",
    "--probe-countermeasures",
    "none",
    "--max-rounds",
    "2",
    "--stop-error",
    "0",
    "--seed",
    "3",
    "--keep-work",
]


# The session's running Ray cluster (conftest's ``ray_cluster``), which the runs here join unless they start their own.
CLUSTER: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _cluster(ray_cluster):
    CLUSTER["address"] = ray_cluster


def _protect(
    train: str,
    out: str,
    fault: str | None = None,
    once: str | None = None,
    extra: list[str] = (),
    env: dict | None = None,
    private: bool = False,
):
    """``protect`` joining the running cluster; ``private``: on a Ray of its own, as a user without a cluster runs it
    (and as a fault hook in a worker needs: a cluster's workers do not have the run's environment)."""
    env = dict(env or {})
    if fault:
        env["UNLEARNABLE_FAULT"] = fault
    if once:
        env["UNLEARNABLE_FAULT_ONCE"] = once
    cluster = None if private else CLUSTER["address"]
    return run_cli("protect", "--input", train, "--output", out, *ARGS, *extra, env=env, ray_address=cluster)


def _load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _tars(out: str) -> dict[str, bytes]:
    return {n: Path(out, n).read_bytes() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def _attempts(out: str) -> list[tuple]:
    folder = os.path.join(out + ".work", "attempts")
    rows = [_load_json(os.path.join(folder, n)) for n in os.listdir(folder)]
    return [(r["unit"], r["round"], r["shard"]) for r in rows]


def _verify(out: str) -> dict:
    proc = run_cli("verify", out, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def reference(mnist_small, tmp_path_factory):
    """The uninterrupted run that interrupted ones must match byte for byte."""
    out = str(tmp_path_factory.mktemp("reference") / "release")
    train = os.path.join(mnist_small["root"], "train")
    t0 = time.monotonic()
    proc = _protect(train, out, private=True)  # private: its time sets the random-kill test's kill times
    assert proc.returncode in (0, 4), proc.stderr[-3000:]
    return {"out": out, "train": train, "code": proc.returncode, "tars": _tars(out), "seconds": time.monotonic() - t0}


def test_sigkill_in_train_noise_and_export_then_rerun_is_byte_identical(reference, tmp_path):
    """Kill the coordinator in a training stage, a noise stage and the export; between the kills, status and verify
    tell the truth about the half-finished run and a live lease stops a second coordinator. The rerun finishes the
    release byte for byte as the uninterrupted run did, and no unit whose marker was written is computed again.

    A finished shard's noise state is written while the worker computes the next shard, so when the coordinator
    dies as train-000001's noise starts, train-000000's commit may or may not have landed: the test reads which,
    and allows exactly that shard (no marker, so not finished) to be computed a second time."""
    out = str(tmp_path / "release")
    train = reference["train"]
    disk = ["--cache", "disk"]
    proc = _protect(train, out, fault="coordinator:train:1:", extra=disk)
    assert proc.returncode == -9, proc.stderr[-2000:]
    _live_lease_refuses_a_second_coordinator(train, out)
    proc = _protect(train, out, fault="coordinator:noise:1:train-000001", extra=disk)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "taking over a stale lease" in proc.stderr  # the killed coordinator's process is gone
    landed = os.path.exists(os.path.join(out + ".work", "round-0001", "noise", "train-000000.json"))
    _status_and_verify_say_in_progress(out, int(landed))
    proc = _protect(train, out, fault="coordinator:export::train-000001", extra=disk)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "_SUCCESS.json"))
    # The export was cut after train-000000 was committed: its marker exists, train-000001's does not.
    assert os.path.exists(os.path.join(out, "train-000000_stats.json"))
    assert not os.path.exists(os.path.join(out, "train-000001_stats.json"))
    proc = _protect(train, out, extra=disk)
    assert proc.returncode == reference["code"], proc.stderr[-3000:]
    assert "resuming after round 1" in proc.stderr
    # Same seed, one worker, CPU: the released shards are the uninterrupted run's, byte for byte (its natives were
    # in memory, these on disk).
    assert _tars(out) == reference["tars"]
    summary = _verify(out)
    assert summary["input"] == 300 and summary["protected"] == 300
    info = json.loads(run_cli("status", out, "--json").stdout)
    assert info["complete"] is True and info["counts"]["input"] == 300
    # No unit whose marker was written was computed again: every unit started exactly once over the runs
    # (the killed attempt dies in the hook before it is logged).
    attempts = _attempts(out)
    repeated = [u for u, n in collections.Counter(attempts).items() if n > 1]
    assert repeated == ([] if landed else [("noise", 1, "train-000000")]), repeated
    shards = ["train-000000", "train-000001", "train-000002"]
    expected = (
        {("train", r, None) for r in (0, 1)}
        | {("noise", r, s) for r in (0, 1) for s in shards}
        | {("check", r, None) for r in (0, 1)}
        | {("export", None, s) for s in shards}
    )
    assert set(attempts) == expected


def _live_lease_refuses_a_second_coordinator(train: str, out: str) -> None:
    """A live lease (fresh heartbeat, a live process) stops a second coordinator with a clear message and exit 3.
    The killed coordinator's lease is stale (its process is gone): impersonate a live one with this test's pid."""
    lease = os.path.join(out + ".work", "lease.json")
    stale = Path(lease).read_text()
    held = json.loads(stale)
    held["pid"] = os.getpid()
    held["heartbeat"] = time.time()
    Path(lease).write_text(json.dumps(held))
    proc = _protect(train, out)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "another coordinator" in proc.stderr.strip().splitlines()[-1]
    Path(lease).write_text(stale)


def _status_and_verify_say_in_progress(out: str, done: int) -> None:
    """Killed in round 1's noise stage as it reached train-000001: ``done`` shards of three are committed."""
    st = run_cli("status", out, "--json")
    assert st.returncode == 3, st.stderr[-2000:]  # incomplete
    info = json.loads(st.stdout)
    assert info["complete"] is False and info["state"] == "in progress"
    assert info["rounds_done"] == 1 and info["round"] == 1 and info["stage"] == "noise"
    assert info["shards"] == {"total": 3, "done": done, "left": 3 - done, "failed": 0}
    assert info["last_error_on_released_data"] is not None
    # The pace of the finished round, and the time left at most (one round of the two to go).
    assert info["seconds_per_round"] > 0 and info["noise_images_per_second"] > 0
    assert abs(info["eta_seconds_at_most"] - info["seconds_per_round"]) <= 1
    text = run_cli("status", out)
    assert "in progress" in text.stdout and f"shards: {done}/3 done, {3 - done} left" in text.stdout
    ver = run_cli("verify", out)
    assert ver.returncode == 1 and "not complete" in (ver.stdout + ver.stderr)
    # No run at all there (a mistyped OUTPUT) is not "incomplete": exit 2 and one line.
    none = run_cli("status", out + "-typo")
    assert none.returncode == 2 and none.stderr.strip().splitlines()[-1].startswith("unlearnable: no run found")


def test_a_worker_that_dies_mid_noise_stage_is_replaced_and_the_run_completes(reference, tmp_path):
    out = str(tmp_path / "release")
    once = str(tmp_path / "worker-died-once")
    proc = _protect(
        reference["train"], out, fault="worker:noise:1:train-000001", once=once, extra=["--cache", "none"], private=True
    )
    assert os.path.exists(once), "the fault hook never fired"
    assert proc.returncode == reference["code"], proc.stderr[-3000:]
    assert "worker died" in proc.stderr
    assert _tars(out) == reference["tars"]
    _verify(out)
    attempts = collections.Counter(_attempts(out))
    # The shard the worker died on is started twice. The shard before it may be too: its state is fetched from the
    # worker while the next shard starts (as in the SIGKILL test), and when the worker dies before that fetch returns,
    # the state is lost with it and computed again. Nothing else is.
    again = sorted(u for u, n in attempts.items() if n > 1)
    assert ("noise", 1, "train-000001") in again
    assert set(again) <= {("noise", 1, "train-000000"), ("noise", 1, "train-000001")}, again


def test_changed_config_is_refused_naming_fields_and_overwrite_starts_over(reference, tmp_path):
    out = str(tmp_path / "release")
    shutil.copytree(reference["out"], out)
    shutil.copytree(reference["out"] + ".work", out + ".work")
    proc = _protect(reference["train"], out, extra=["--train-steps", "4", "--mode", "classwise"])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "train_steps" in last and "mode" in last and "--overwrite" in last
    assert "it was started with mode='samplewise', train_steps=3:" in last  # how to resume it
    assert _tars(out) == reference["tars"]  # the refused run touched nothing
    proc = _protect(reference["train"], out, extra=["--train-steps", "4", "--overwrite"])
    assert proc.returncode in (0, 4), proc.stderr[-3000:]
    success = _load_json(os.path.join(out, "_SUCCESS.json"))
    assert success["config"]["train_steps"] == 4
    _verify(out)


def test_verify_catches_a_tampered_release(reference, tmp_path):
    out = str(tmp_path / "release")
    shutil.copytree(reference["out"], out)
    path = os.path.join(out, "train-000001.tar")
    data = bytearray(Path(path).read_bytes())
    data[1000] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    Path(out, "noise.npy").write_bytes(b"x")
    proc = run_cli("verify", out)
    assert proc.returncode == 1
    text = proc.stdout + proc.stderr
    assert "train-000001.tar does not match its marker" in text and "unexpected object" in text


# ---------------------------------------------------------------------------------------------------- state is checked


def _overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_damaged_noise_state_and_truncated_checkpoint_are_recomputed_never_loaded(reference, tmp_path):
    """Killed as the export starts (every round finished); then 64 bytes of a committed noise state are overwritten,
    another noise state and the last checkpoint are truncated. The rerun checks each against its marker's sha256,
    recomputes the three units from the round before, and releases the uninterrupted run's bytes."""
    out = str(tmp_path / "release")
    proc = _protect(reference["train"], out, fault="coordinator:export::train-000000")
    assert proc.returncode == -9, proc.stderr[-2000:]
    round1 = os.path.join(out + ".work", "round-0001")
    _overwrite(os.path.join(round1, "noise", "train-000000.pt"), 600, b"\x07" * 64)
    os.truncate(os.path.join(round1, "noise", "train-000002.pt"), 500)
    os.truncate(os.path.join(round1, "surrogate.pt"), 1000)
    proc = _protect(reference["train"], out)
    assert proc.returncode == reference["code"], proc.stderr[-3000:]
    assert proc.stderr.count("sha256 differs from its marker") == 3, proc.stderr[-3000:]
    assert "resuming after round 0" in proc.stderr
    assert _tars(out) == reference["tars"]
    _verify(out)


def test_a_rerun_of_a_finished_run_repairs_a_lost_shard_from_the_kept_state(reference, tmp_path):
    out = str(tmp_path / "release")
    shutil.copytree(reference["out"], out)
    shutil.copytree(reference["out"] + ".work", out + ".work")
    os.remove(os.path.join(out, "train-000001.tar"))
    assert run_cli("verify", out).returncode == 1
    proc = _protect(reference["train"], out)
    assert proc.returncode == reference["code"], proc.stderr[-3000:]
    assert "rewriting 1 damaged shard(s) from the kept state: train-000001" in proc.stderr
    assert _tars(out) == reference["tars"]
    _verify(out)
    # Without the kept state nothing can rewrite it: exit 2, one line naming the shard and the ways out.
    shutil.rmtree(out + ".work")
    os.remove(os.path.join(out, "train-000001.tar"))
    proc = _protect(reference["train"], out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "train-000001" in last and "--overwrite" in last and "Traceback" not in proc.stderr
    assert not os.path.exists(out + ".work")  # the refused rerun left nothing behind


def test_verify_checks_every_merged_manifest_row_and_a_rerun_rewrites_a_forged_manifest(reference, tmp_path):
    """Forged rows in manifest.parquet, the row count kept: verify names the row; the rerun rebuilds the merged
    manifest from the shards' manifests (which their markers vouch for)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path / "release")
    shutil.copytree(reference["out"], out)
    shutil.copytree(reference["out"] + ".work", out + ".work")
    path = os.path.join(out, "manifest.parquet")
    original = Path(path).read_bytes()
    table = pq.read_table(path)
    assert "source_sha256" not in table.column_names  # no input hashes unless asked for
    rows = table.to_pylist()
    rows[7] = {**rows[7], "linf": 200, "output_sha256": "0" * 64}
    rows[8] = {**rows[8], "key": "forged", "status": "rejected"}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    proc = run_cli("verify", out)
    assert proc.returncode == 1 and "manifest.parquet row 7" in proc.stdout, proc.stdout
    proc = _protect(reference["train"], out)
    assert proc.returncode == reference["code"], proc.stderr[-3000:]
    assert Path(path).read_bytes() == original
    _verify(out)


def test_a_finished_run_whose_clean_up_was_cut_short_is_cleaned_by_the_rerun_and_nothing_is_left(reference, tmp_path):
    """The state a kill between _SUCCESS.json and the clean-up leaves: the release and a full work dir. A rerun
    without --keep-work verifies the release, deletes the work dir's files (the noise can undo the protection),
    and a further rerun does not create a work dir again."""
    out = str(tmp_path / "release")
    shutil.copytree(reference["out"], out)
    shutil.copytree(reference["out"] + ".work", out + ".work")
    args = [a for a in ARGS if a != "--keep-work"]
    for _ in range(2):
        proc = run_cli("protect", "--input", reference["train"], "--output", out, *args)
        assert proc.returncode == reference["code"], proc.stderr[-3000:]
        assert not os.path.exists(out + ".work")
    assert _tars(out) == reference["tars"]
    _verify(out)


def test_clean_up_deletes_only_the_files_a_run_wrote(reference, tmp_path):
    """A work dir the user already had (their own files in it) keeps those files and itself."""
    out, work = str(tmp_path / "release"), str(tmp_path / "mine")
    shutil.copytree(reference["out"], out)
    shutil.copytree(reference["out"] + ".work", work)
    run = _load_json(os.path.join(work, "run.json"))
    run["work_dir_created"] = False
    Path(work, "run.json").write_text(json.dumps(run))
    Path(work, "notes.txt").write_text("mine")
    os.makedirs(os.path.join(work, "round-0001", "mine"))
    args = [a for a in ARGS if a != "--keep-work"]
    proc = run_cli("protect", "--input", reference["train"], "--output", out, "--work-dir", work, *args)
    assert proc.returncode == reference["code"], proc.stderr[-3000:]
    left = sorted(os.path.relpath(os.path.join(d, n), work) for d, dirs, files in os.walk(work) for n in dirs + files)
    assert left == ["notes.txt", "round-0001", os.path.join("round-0001", "mine")]


# ---------------------------------------------------------------------------------------------------- random kills


def _ray_processes(tmp: str) -> set[int]:
    """PIDs of Ray's processes (head services, agents, workers) that runs with ``RAY_TMPDIR=tmp`` started: each
    inherits that variable, so Ray processes of other tests running at the same time are not counted."""
    found = set()
    mark = f"RAY_TMPDIR={tmp}".encode() + b"\0"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            with open(f"/proc/{pid}/environ", "rb") as f:
                ours = mark in f.read() + b"\0"
        except OSError:
            continue  # gone meanwhile
        ray = any(
            m in cmd
            for m in (
                "ray::",
                "raylet",
                "gcs_server",
                "dashboard/agent.py",
                "runtime_env/agent",
                "log_monitor.py",
                "ray/_private/workers",
            )
        )
        if ours and ray and not zombie:
            found.add(int(pid))
    return found


def test_sigkill_at_ten_random_moments_then_the_rerun_releases_the_same_bytes(reference, tmp_path):
    """SIGKILL the coordinator at 10 random moments (timed, not hooked): each rerun resumes where the last left off,
    wherever the kill fell (plan, Ray start, a stage, a commit, the export, the clean-up); every rerun that finishes
    releases the uninterrupted run's bytes and verifies (then the next attempts start a new run, so that all 10 kills
    land on unfinished work), and the kills leave no Ray process behind."""
    # Ray's files under a folder of this test's own (short: Ray's socket paths must stay short), which also marks
    # the Ray processes these runs start.
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    rng = random.Random(20261202)
    out = str(tmp_path / "release")
    # --cache none: every stop check decodes the digits again from the input; the release is the same.
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "protect",
        "--input",
        reference["train"],
        "--output",
        out,
        *ARGS,
        "--cache",
        "none",
    ]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    kills = []
    for _ in range(30):  # until 10 kills have landed
        if len(kills) == 10:
            break
        # A kill lands anywhere in the first 60% of a whole run's time; each rerun starts from what the kills left.
        at = rng.uniform(0.5, 0.6 * reference["seconds"])
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=at)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills.append(round(at, 1))
            continue
        # Finished before its kill: the release must be the uninterrupted one; the next attempts start a new run.
        assert proc.returncode == reference["code"], err[-3000:]
        assert _tars(out) == reference["tars"], kills
        _verify(out)
        shutil.rmtree(out)
        shutil.rmtree(out + ".work")
    assert len(kills) == 10, kills
    proc = _protect(reference["train"], out, extra=["--cache", "none"], env={"RAY_TMPDIR": ray_tmp}, private=True)
    assert proc.returncode == reference["code"], (kills, proc.stderr[-3000:])
    assert _tars(out) == reference["tars"], kills
    _verify(out)
    # A killed coordinator's Ray processes notice that their raylet is gone and exit on their own (Ray's agents take
    # up to about a minute): none may be left.
    deadline = time.monotonic() + 150
    while (left := _ray_processes(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(2)
    assert not left, f"Ray processes left behind by the kills at {kills} s: {sorted(left)}"
    shutil.rmtree(ray_tmp, ignore_errors=True)
