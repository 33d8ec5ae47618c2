"""The storage layer against the real SeaweedFS S3 server: the commit protocol's primitives, markers seen at once
by another reader, and shards streamed (with read-ahead) from a bucket exactly as from a local folder."""

from __future__ import annotations

import os

import pytest
from conftest import READER_KEY, READER_SECRET, make_bucket, upload_dir

from pipeline.storage import fs
from pipeline.storage.layout import default_work_dir
from pipeline.storage.markers import is_done, write_marker
from pipeline.storage.shards import RawSample, iter_samples, read_ahead


@pytest.fixture(scope="module")
def bucket(s3_server):
    make_bucket(s3_server, "storage-test")
    return "s3://storage-test"


def test_write_read_size_list_find_remove_on_s3(s3_env, bucket):
    url = fs.join(bucket, "run", "round-0000", "noise", "a.pt")
    sha = fs.write_verified(url, b"x" * 10_000)
    assert fs.read_bytes(url) == b"x" * 10_000 and fs.size(url) == 10_000 and len(sha) == 64
    fs.write_bytes(fs.join(bucket, "run", "round-0000", "noise", "b.pt"), b"")
    assert fs.listdir(fs.join(bucket, "run", "round-0000", "noise")) == ["a.pt", "b.pt"]
    assert fs.find(fs.join(bucket, "run"), ".pt") == [
        f"{bucket}/run/round-0000/noise/a.pt",
        f"{bucket}/run/round-0000/noise/b.pt",
    ]
    fs.remove(fs.join(bucket, "run", "round-0000"), recursive=True)
    # (SeaweedFS, like some other stores, may keep the emptied "folder" itself; what counts is that no object is left)
    assert not fs.exists(url) and fs.find(fs.join(bucket, "run"), ".pt") == []
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(url)


def test_a_marker_written_after_a_listing_is_seen_at_once(s3_env, bucket):
    folder = fs.join(bucket, "markers")
    fs.write_bytes(fs.join(folder, "other.json"), b"{}")
    assert fs.listdir(folder) == ["other.json"]  # a listing that a cache could keep
    marker = fs.join(folder, "shard-1.json")
    assert not is_done(marker, "abc")
    write_marker(marker, "abc", rows=3)
    assert is_done(marker, "abc") and not is_done(marker, "other-config")


def test_shards_stream_from_a_bucket_like_from_a_folder(s3_env, bucket, mnist_small):
    local = os.path.join(mnist_small["root"], "train")
    upload_dir(s3_env, local, f"{bucket}/mnist/train")
    names = sorted(os.listdir(local))
    remote = [f"{bucket}/mnist/train/{n}" for n in names]
    from_s3 = [[(s.key, s.members) for s in shard if isinstance(s, RawSample)] for shard in read_ahead(remote)]
    from_disk = [
        [(s.key, s.members) for s in iter_samples(os.path.join(local, n)) if isinstance(s, RawSample)] for n in names
    ]
    assert from_s3 == from_disk and sum(len(s) for s in from_s3) == 300


def test_an_output_at_a_bucket_root_needs_a_work_dir():
    with pytest.raises(ValueError, match="--work-dir"):
        default_work_dir("s3://bucket")
    assert default_work_dir("s3://bucket/protected/") == "s3://bucket/protected.work"


# ---------------------------------------------------------------------------------------------------- permanent errors


def _protect_line(capsys, *args: str) -> tuple[int, list[str]]:
    from pipeline.cli import main

    code = main(["protect", "--resolution", "8", "--max-rounds", "1", *args])
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("unlearnable:")]
    return code, lines


def test_a_bucket_one_may_not_write_is_exit_2_in_one_line_not_rerun_to_resume(
    s3_env, capsys, bucket, mnist_small, monkeypatch
):
    """An identity that may read but not write (SeaweedFS's Read and List actions): the plan is read, the first
    write is denied, and no rerun can mend that."""
    import fsspec

    upload_dir(s3_env, os.path.join(mnist_small["root"], "train"), f"{bucket}/readonly/train")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET)
    fsspec.filesystem("s3").clear_instance_cache()
    code, lines = _protect_line(capsys, "--input", f"{bucket}/readonly/train", "--output", f"{bucket}/readonly/out")
    assert code == 2 and len(lines) == 1, lines
    assert "rerun the same command" not in lines[0] and "PermissionError" in lines[0], lines
    assert READER_KEY not in lines[0] and READER_SECRET not in lines[0]


def test_access_denied_is_exit_2_and_the_credentials_are_never_repeated(
    s3_env, capsys, bucket, mnist_small, monkeypatch
):
    import fsspec

    upload_dir(s3_env, os.path.join(mnist_small["root"], "train"), f"{bucket}/denied/train")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-of-this-key")
    fsspec.filesystem("s3").clear_instance_cache()
    code, lines = _protect_line(capsys, "--input", f"{bucket}/denied/train", "--output", f"{bucket}/denied/out")
    assert code == 2 and len(lines) == 1, lines
    assert s3_env["AWS_ACCESS_KEY_ID"] not in lines[0] and "not-the-secret" not in lines[0]
