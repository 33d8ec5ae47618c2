"""On a cluster as users run it: a Ray head started with ``ray start``, ``unlearnable protect`` submitted with
``ray job submit``, two CPU workers, input and output in a bucket of the real SeaweedFS S3 server.

The job's S3 credentials reach it the way they must on a cluster: from the nodes' environment (here:
the head was started with the AWS variables, as a pod gets them from a secret), never through the job's
runtime_env or metadata. The test checks that the secret shows up in no log, no job metadata and no released file.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import RAY, REPO, free_port, make_bucket, ray_head_command, stop_server, upload_dir
from PIL import Image

# Sample-wise small-cnn on 1,000 real digits: the demo's PGD settings, 20 train steps a round (measured here: the stop
# rule after 4 rounds, probe 26.0% against a 33.9% threshold, 83 s with 2 CPU workers).
PROTECT = [
    "--workers",
    "2",
    "--resolution",
    "28",
    "--pgd-steps",
    "10",
    "--step-size",
    "8/1275",
    "--train-steps",
    "20",
    "--batch-size",
    "256",
    "--probe-steps",
    "150",
    "--probe-countermeasures",
    "none",
    "--stop-error",
    "0.02",
    "--max-rounds",
    "10",
    "--keep-work",
]


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """The ``ray`` CLI; callers judge the exit status (the head is polled until it answers). A command past its
    timeout reads as a failed one (exit 124) rather than raising."""
    try:
        return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, str(exc.stdout or ""), f"timed out after {timeout} s")


def _log_tail(log_path: str) -> str:
    with open(log_path) as f:
        return f.read()[-3000:]


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """``ray start --head --block`` on loopback with token auth off; stopped by its PID (its process group)."""
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # Ray's socket paths must stay short
    dashboard = free_port()
    env = {**os.environ, **s3_server, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    args = ray_head_command(temp, free_port(), 4, "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}")
    log_path = os.path.join(temp, "head.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    client_env["RAY_AUTH_MODE"] = "disabled"
    try:
        deadline = time.monotonic() + 180
        while _ray("job", "list", "--address", address, env=client_env, timeout=60).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up: {_log_tail(log_path)}")
            time.sleep(2)
        yield {"address": address, "env": client_env}
    finally:
        stop_server(proc, timeout=10)  # a head drains for up to 30 s on SIGTERM; nothing of it is needed here
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(ray_head, s3_server, tmp_path_factory):
    """The corpus uploaded to a bucket, then one ``ray job submit`` of protect; waits for a terminal status."""
    from tools.mnist import make_mnist_corpus

    local = tmp_path_factory.mktemp("mnist-1k")
    make_mnist_corpus(str(local), per_class_train=100, per_class_test=20, per_shard=250)
    make_bucket(s3_server, "corpus")
    make_bucket(s3_server, "release")
    upload_dir(s3_server, os.path.join(local, "train"), "s3://corpus/mnist/train")
    entrypoint = [
        sys.executable,
        "-m",
        "pipeline",
        "protect",
        "--input",
        "s3://corpus/mnist/train",
        "--output",
        "s3://release/mnist",
        *PROTECT,
    ]
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head["address"])

    def submit(sid: str, env_vars: dict) -> str:
        # Fault hooks for this test only travel in the runtime_env; credentials never do (they come from the nodes).
        proc = _ray(
            "job",
            "submit",
            "--address",
            ray_head["address"],
            "--submission-id",
            sid,
            "--no-wait",
            "--entrypoint-num-cpus",
            "0",
            "--runtime-env-json",
            json.dumps({"env_vars": env_vars}),
            "--",
            *entrypoint,
            env=ray_head["env"],
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        deadline = time.monotonic() + 900
        while client.get_job_status(sid) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.monotonic() < deadline, "the job did not finish in 15 minutes"
            time.sleep(3)
        return client.get_job_status(sid).value

    # First submission: the coordinator is SIGKILLed as round 1's noise stage reaches shard 2 (a lost head node).
    first = submit(f"protect-a-{os.getpid()}", {"UNLEARNABLE_FAULT": "coordinator:noise:1:train-000002"})
    # The same command again resumes; this time a worker dies in round 2 and the pool is restarted.
    sid = f"protect-b-{os.getpid()}"
    status = submit(
        sid,
        {
            "UNLEARNABLE_FAULT": "worker:noise:2:train-000001",
            "UNLEARNABLE_FAULT_ONCE": str(local / "worker-fault-done"),
        },
    )
    logs = _ray("job", "logs", "--address", ray_head["address"], sid, env=ray_head["env"]).stdout
    listing = _ray("job", "list", "--address", ray_head["address"], env=ray_head["env"]).stdout
    listing += json.dumps(vars(client.get_job_info(sid)), default=str)
    s3 = s3fs.S3FileSystem(
        endpoint_url=s3_server["AWS_ENDPOINT_URL"],
        key=s3_server["AWS_ACCESS_KEY_ID"],
        secret=s3_server["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    return {"first": first, "status": status, "logs": logs, "listing": listing, "s3": s3, "local": str(local)}


def _fail(submitted) -> str:
    return f"status {submitted['status']}; job log tail:\n{submitted['logs'][-4000:]}"


def test_ray_job_submit_of_protect_on_s3_succeeds(submitted):
    assert submitted["status"] == "SUCCEEDED", _fail(submitted)  # exit 0: complete and protected
    success = json.loads(submitted["s3"].cat_file("release/mnist/_SUCCESS.json"))
    assert success["stop_reason"] == "stop_rule" and success["protection"]["holds"] is True
    assert success["surrogate_error"] <= 0.02
    assert success["config"]["workers"] == 2
    assert success["counts"] == {"input": 1000, "protected": 1000, "rejected": 0}


def test_two_workers_shared_the_corpus_and_the_logs_show_progress(submitted):
    logs = submitted["logs"]
    assert "starting 2 worker(s)" in logs and "process group gloo" in logs, _fail(submitted)
    # A person following `ray job logs -f` sees the round, the stage, shards done of total, images/s and the error.
    assert re.search(r"round \d+ noise: 4/4 shards done .*images/s", logs), _fail(submitted)
    assert re.search(r"round \d+: surrogate error on released data \d\.\d+", logs), _fail(submitted)
    assert re.search(r"export: 4/4 shards written", logs), _fail(submitted)


def test_release_in_the_bucket_is_bounded_and_has_every_key_once(submitted):
    s3, local = submitted["s3"], submitted["local"]
    shards = [f"train-{i:06d}" for i in range(4)]
    names = {os.path.basename(p) for p in s3.ls("release/mnist")}
    assert names == {f"{s}{x}" for s in shards for x in (".tar", ".parquet", "_stats.json")} | {
        "manifest.parquet",
        "_SUCCESS.json",
    }, _fail(submitted)
    keys = []
    for shard in shards:
        with tarfile.open(os.path.join(local, "train", f"{shard}.tar")) as tar:
            originals = {
                m.name[:-4]: np.array(Image.open(io.BytesIO(tar.extractfile(m).read())))
                for m in tar.getmembers()
                if m.name.endswith(".png")
            }
        with tarfile.open(fileobj=io.BytesIO(s3.cat_file(f"release/mnist/{shard}.tar"))) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    key = m.name[:-4]
                    keys.append(key)
                    released = np.array(Image.open(io.BytesIO(tar.extractfile(m).read())))
                    assert released.shape == originals[key].shape
                    assert np.abs(released.astype(int) - originals[key].astype(int)).max() <= 8
    assert len(keys) == len(set(keys)) == 1000
    rows = pq.read_table(io.BytesIO(s3.cat_file("release/mnist/manifest.parquet"))).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(keys)
    assert all(r["status"] == "protected" and 0 <= r["linf"] <= 8 for r in rows)
    assert sum(r["linf"] > 0 for r in rows) >= 0.9 * len(rows)
    # The work dir (noise state, checkpoints; kept here with --keep-work) is beside the output, never in it.
    assert s3.exists("release/mnist.work/run.json") and not any("round-" in p for p in s3.find("release/mnist"))


def test_a_killed_job_resubmitted_resumes_and_survives_a_worker_death(submitted):
    assert submitted["first"] == "FAILED" and submitted["status"] == "SUCCEEDED", _fail(submitted)
    s3 = submitted["s3"]
    attempts = [json.loads(s3.cat_file(p)) for p in s3.find("release/mnist.work/attempts")]
    units = collections.Counter((a["unit"], a["round"], a["shard"]) for a in attempts)
    success = json.loads(s3.cat_file("release/mnist/_SUCCESS.json"))
    # Nothing finished was redone across the resubmission and the pool restart: every round trained once.
    assert [units[("train", r, None)] for r in range(success["rounds"])] == [1] * success["rounds"]
    assert max(n for (unit, _, _), n in units.items() if unit == "check") == 1
    assert units[("noise", 0, "train-000002")] == 1 and units[("noise", 1, "train-000002")] == 1
    assert units[("noise", 2, "train-000001")] == 2  # the unit the worker died in, and only units in flight, twice
    assert all(n <= 2 for n in units.values())
    assert "restarting the pool" in submitted["logs"] and "resuming after round 0" in submitted["logs"]


def test_credentials_never_reach_logs_job_metadata_or_the_release(submitted, s3_server):
    secret = s3_server["AWS_SECRET_ACCESS_KEY"]
    assert secret not in submitted["logs"] and secret not in submitted["listing"]
    s3 = submitted["s3"]
    for path in s3.find("release/mnist"):
        assert secret.encode() not in s3.cat_file(path), path


def test_verify_and_status_read_the_release_from_s3(submitted, s3_server):
    env = {**os.environ, **s3_server}
    env.pop("RAY_ADDRESS", None)
    for verb in ("verify", "status"):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", verb, "s3://release/mnist", "--json"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=REPO,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
        info = json.loads(proc.stdout)
        assert info.get("ok", info.get("complete")) is True
