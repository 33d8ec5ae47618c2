"""Unit tests for pipeline/storage: atomic writes and retries (fs), WebDataset shards, manifests, markers, layout."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from PIL import Image

from pipeline.storage import fs, manifest, markers, shards
from pipeline.storage.layout import Layout, check_work_dir_outside, default_work_dir
from pipeline.storage.shards import RawSample, ShardReadError, iter_samples, shard_id, split_member_name, write_tar

DESIGN_COLUMNS = [
    "key",
    "shard",
    "status",
    "error",
    "label",
    "width",
    "height",
    "output_sha256",
    "output_member",
    "linf",
    "l2",
    "psnr",
]  # and source_sha256 after height, only when the run asks for it (--manifest-source-hash)


# ---------------------------------------------------------------------------------------------------- helpers


def _png(value: int = 0, size: tuple[int, int] = (4, 4), mode: str = "L", noise: bool = False) -> bytes:
    if noise:  # incompressible pixels: a member spanning several 512-byte tar blocks
        rng = np.random.default_rng(value)
        channels = 3 if mode == "RGB" else None
        shape = (size[1], size[0], channels) if channels else (size[1], size[0])
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    else:
        img = Image.new(mode, size, value if mode == "L" else (value, value, value))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _samples(n: int = 4, noise: bool = False) -> list[RawSample]:
    return [
        RawSample(
            f"s{i:04d}",
            {"png": _png(i, (24, 24), noise=noise), "cls": str(i % 3).encode(), "json": json.dumps({"i": i}).encode()},
        )
        for i in range(n)
    ]


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _member_offsets(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: info for info in tar.getmembers()}


def _split_items(items):
    """(intact samples, read errors); a sample the cut went through is yielded marked ``truncated`` and left out."""
    raws = [it for it in items if isinstance(it, RawSample) and not it.truncated]
    errors = [it for it in items if isinstance(it, ShardReadError)]
    cut = [it for it in items if isinstance(it, RawSample) and it.truncated]
    assert len(cut) <= 1 and (not cut or items[-2] is cut[0]), "only the sample at the cut may be marked truncated"
    return raws, errors


# ---------------------------------------------------------------------------------------------------- fs


def test_write_bytes_is_atomic_and_leaves_no_temp_files(tmp_path):
    url = str(tmp_path / "a" / "b" / "obj.tar")  # parent folders are created
    fs.write_bytes(url, b"first")
    fs.write_bytes(url, b"second version")
    assert fs.read_bytes(url) == b"second version"
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["obj.tar"]


def test_write_bytes_failure_removes_temp_file_and_keeps_old_content(tmp_path, monkeypatch):
    url = str(tmp_path / "obj.parquet")
    fs.write_bytes(url, b"old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        fs.write_bytes(url, b"new")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["obj.parquet"]  # no .tmp-* left behind
    assert fs.read_bytes(url) == b"old"


def test_write_bytes_failure_on_new_file_leaves_nothing(tmp_path, monkeypatch):
    url = str(tmp_path / "fresh.tar")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fs.write_bytes(url, b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_write_verified_returns_sha256_and_size_matches(tmp_path):
    url = str(tmp_path / "x.bin")
    data = os.urandom(3000)
    digest = fs.write_verified(url, data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert fs.size(url) == len(data) == os.path.getsize(url)
    assert fs.read_bytes(url) == data


def test_write_verified_raises_when_store_reports_another_size(tmp_path, monkeypatch):
    url = str(tmp_path / "x.bin")
    monkeypatch.setattr(fs, "size", lambda u: 1)
    with pytest.raises(OSError, match="verification failed"):
        fs.write_verified(url, b"12345")


def test_find_lists_tar_files_under_a_folder(tmp_path):
    for rel in ["a.tar", "sub/b.tar", "sub/deeper/c.tar", "notes.txt", "sub/d.tar.gz", "e.parquet"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    found = fs.find(str(tmp_path), ".tar")
    assert found == sorted(found)
    assert [os.path.relpath(p, tmp_path) for p in found] == ["a.tar", "sub/b.tar", "sub/deeper/c.tar"]


def test_read_bytes_of_missing_file_raises_file_not_found_without_retrying(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(fs.time, "sleep", sleeps.append)
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(str(tmp_path / "missing.json"))
    assert sleeps == []


def test_retry_retries_oserror_then_succeeds(monkeypatch):
    sleeps = []
    monkeypatch.setattr(fs.time, "sleep", sleeps.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")  # an OSError
        return "ok"

    assert fs.retry(flaky, "flaky", attempts=4, base_delay=0.5) == "ok"
    assert len(calls) == 3
    assert sleeps == [0.5, 1.0]  # exponential backoff


def test_retry_does_not_retry_file_not_found(monkeypatch):
    monkeypatch.setattr(fs.time, "sleep", lambda s: None)
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        fs.retry(missing, "missing")
    assert len(calls) == 1


def test_retry_gives_up_after_the_last_attempt(monkeypatch):
    monkeypatch.setattr(fs.time, "sleep", lambda s: None)
    calls = []

    def always():
        calls.append(1)
        raise OSError("still down")

    with pytest.raises(OSError, match="still down"):
        fs.retry(always, "always", attempts=3)
    assert len(calls) == 3


def test_retry_does_not_retry_non_io_errors(monkeypatch):
    monkeypatch.setattr(fs.time, "sleep", lambda s: None)
    calls = []

    def bug():
        calls.append(1)
        raise ValueError("a bug, not a transient error")

    with pytest.raises(ValueError):
        fs.retry(bug, "bug")
    assert len(calls) == 1


def test_exists_listdir_remove(tmp_path):
    fs.write_bytes(str(tmp_path / "d" / "b.txt"), b"1")
    fs.write_bytes(str(tmp_path / "d" / "a.txt"), b"2")
    assert fs.exists(str(tmp_path / "d" / "a.txt"))
    assert fs.listdir(str(tmp_path / "d")) == ["a.txt", "b.txt"]
    assert fs.listdir(str(tmp_path / "nothing")) == []
    fs.remove(str(tmp_path / "d"), recursive=True)
    assert not fs.exists(str(tmp_path / "d"))
    fs.remove(str(tmp_path / "d"))  # removing what is gone is fine


def test_join_and_strip_url():
    assert fs.join("s3://bkt/out/", "a.tar") == "s3://bkt/out/a.tar"
    assert fs.join("/data/out", "round-0001", "noise") == "/data/out/round-0001/noise"
    assert fs.strip_url("s3://bkt/out/") == "s3://bkt/out"
    assert fs.is_local("/tmp/x") and not fs.is_local("memory://x")


# ---------------------------------------------------------------------------------------------------- shards


def test_write_tar_is_byte_deterministic():
    a = write_tar(_samples(3))
    b = write_tar(_samples(3))
    assert a == b
    assert a != write_tar(_samples(2))


def test_write_tar_members_are_key_dot_ext_with_fixed_metadata():
    data = write_tar(_samples(2))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
        names = [i.name for i in infos]
        assert names == ["s0000.cls", "s0000.json", "s0000.png", "s0001.cls", "s0001.json", "s0001.png"]
        assert all(i.mtime == 0 and i.isfile() for i in infos)
        assert tar.extractfile("s0001.cls").read() == b"1"
        assert tar.extractfile("s0000.png").read() == _samples(1)[0].members["png"]


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar]


def _plain_first(data: bytes) -> list[tuple[str, bytes]]:
    name, offset, size = shards.plain_tar_members(data)[0]
    return [(name, data[offset : offset + size])]


def test_plain_tar_members_read_what_tarfile_reads_and_leave_the_rest_to_it():
    from pipeline.inspection import _tar_members

    data = write_tar(_samples(3) + [RawSample("folder/key", {"png": b"x" * 700, "cls": b"3"})])
    plain = shards.plain_tar_members(data)
    assert [(n, data[o : o + size]) for n, o, size in plain] == _tarfile_members(data)
    assert [(n, read()) for n, read in _tar_members(data)] == _tarfile_members(data)
    # A ustar writer splits a name over 100 characters into the header's prefix and name fields.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("folder-" + "f" * 60 + "/" + "k" * 80 + ".png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    split = buf.getvalue()
    assert [(n, split[o : o + size]) for n, o, size in shards.plain_tar_members(split)] == _tarfile_members(split)
    # write_tar gives a longer name a pax header: tarfile reads that one, with the same result.
    long_name = write_tar([RawSample("k" * 300, {"png": b"y"})])
    assert shards.plain_tar_members(long_name) is None
    assert [(n, read()) for n, read in _tar_members(long_name)] == [("k" * 300 + ".png", b"y")]
    # A header whose checksum fails, a member cut short, no end-of-archive block: left to tarfile.
    bad = bytearray(data)
    bad[512 * 2 + 5] ^= 1  # the second member's header (the first member's data is one block)
    assert shards.plain_tar_members(bytes(bad)) is None
    # (tarfile takes a bad header after the first for the end of the archive: verify then finds members missing.)
    assert [(n, read()) for n, read in _tar_members(bytes(bad))] == _tarfile_members(bytes(bad)) == _plain_first(data)
    assert shards.plain_tar_members(data[: 512 + 100]) is None
    end = len(data) - 1024
    while not any(data[end - 512 : end]):
        end -= 512
    assert shards.plain_tar_members(data[:end]) is None and shards.plain_tar_members(data[: end + 512]) is not None


def test_write_tar_is_readable_by_webdataset(tmp_path):
    import webdataset as wds

    samples = _samples(3)
    url = _write(tmp_path / "shard-000000.tar", write_tar(samples))
    got = list(wds.WebDataset(url, shardshuffle=False))
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples):
        assert {k: v for k, v in g.items() if not k.startswith("__")} == s.members


def test_iter_samples_groups_members_by_key_in_order(tmp_path):
    samples = _samples(5)
    url = _write(tmp_path / "s.tar", write_tar(samples))
    got = list(iter_samples(url))
    assert all(isinstance(g, RawSample) for g in got)
    assert got == samples


def test_iter_samples_handles_keys_with_folders_and_multi_dot_extensions(tmp_path):
    samples = [
        RawSample("a/b/0001", {"seg.png": _png(1), "png": _png(2), "cls": b"1"}),
        RawSample("a/b/0002", {"seg.png": _png(3), "cls": b"0"}),
    ]
    data = write_tar(samples)
    assert "a/b/0001.seg.png" in _member_offsets(data)
    got = list(iter_samples(_write(tmp_path / "s.tar", data)))
    assert [g.key for g in got] == ["a/b/0001", "a/b/0002"]
    assert got[0].members == samples[0].members
    assert sorted(got[0].members) == ["cls", "png", "seg.png"]


def _members_by_tarfile(data: bytes) -> list:
    """What tarfile's stream reader makes of ``data``: each regular file's (name, bytes), or the error it raises."""
    out: list = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    out.append((info.name, tar.extractfile(info).read()))
    except (tarfile.TarError, EOFError) as exc:
        return [*out, f"error {type(exc).__name__}: {exc}"]
    return out


def _members_read_here(data: bytes) -> list:
    out: list = []
    try:
        for name, read in shards._regular_files(io.BytesIO(data)):
            out.append((name, read()))
    except (tarfile.TarError, EOFError) as exc:
        return [*out, f"error {type(exc).__name__}: {exc}"]
    return out


def test_shards_stream_as_tarfile_streams_them_whole_cut_damaged_or_in_other_formats():
    """iter_samples reads plain POSIX headers itself and hands anything else to tarfile: member for member and
    error for error, the same as tarfile's stream reader on every kind of tar, cut at every block."""
    import gzip

    plain = write_tar(_samples(3))
    pax_inside = write_tar([*_samples(2), RawSample("k" * 300, {"png": b"y" * 600}), *_samples(1)])
    other = {}
    for fmt in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            folder = tarfile.TarInfo("d")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            info = tarfile.TarInfo("d/0001.png")
            info.size = 700
            tar.addfile(info, io.BytesIO(b"p" * 700))
        other[fmt] = buf.getvalue()
    damaged = bytearray(plain)
    damaged[512 * 2 + 5] ^= 1  # the second header's checksum fails: tarfile ends the archive there
    cases = {
        "plain": plain,
        "pax inside": pax_inside,
        "gnu": other[tarfile.GNU_FORMAT],
        "ustar with a folder": other[tarfile.USTAR_FORMAT],
        "gzip": gzip.compress(plain, mtime=0),
        "damaged": bytes(damaged),
        "empty": b"",
        "zero blocks only": bytes(1024),
        "not a tar": b"x" * 600,
    }
    for cut in range(0, len(plain), 256):
        cases[f"plain cut at {cut}"] = plain[:cut]
    for cut in range(0, len(pax_inside), 512):
        cases[f"pax inside cut at {cut}"] = pax_inside[:cut]
    for name, data in cases.items():
        assert _members_read_here(data) == _members_by_tarfile(data), name
    assert [n for n, _ in _members_read_here(pax_inside)][-4:] == [
        "k" * 300 + ".png",
        "s0000.cls",
        "s0000.json",
        "s0000.png",
    ]


def test_split_member_name():
    assert split_member_name("a/b/0001.seg.png") == ("a/b/0001", "seg.png")
    assert split_member_name("0001.png") == ("0001", "png")
    assert split_member_name("dir.v2/0001.png") == ("dir.v2/0001", "png")
    assert split_member_name("README") == ("README", "")


def test_truncated_tar_cut_in_half_ends_with_a_shard_read_error(tmp_path):
    """Cutting a shard's bytes in half must not read as a complete, shorter shard.

    A tar is a multiple of 512-byte blocks (here of the 10240-byte record), so half of it ends on a block
    boundary; the stream must still be reported as unreadable to its end (the end-of-archive blocks are missing).
    """
    samples = _samples(6, noise=True)
    data = write_tar(samples)
    url = _write(tmp_path / "s.tar", data[: len(data) // 2])
    items = list(iter_samples(url))
    raws, errors = _split_items(items)
    assert errors, f"truncated shard read as complete: {[r.key for r in raws]}"
    assert isinstance(items[-1], ShardReadError) and len(errors) == 1
    assert 0 < len(raws) < len(samples)
    assert raws == samples[: len(raws)]  # only complete samples


@pytest.mark.parametrize("member", ["s0002.cls", "s0002.png"], ids=["between-samples", "inside-a-sample"])
def test_truncated_tar_cut_at_a_member_header_ends_with_a_shard_read_error(tmp_path, member):
    samples = _samples(4)
    data = write_tar(samples)
    cut = _member_offsets(data)[member].offset  # a 512-byte block boundary where a member header starts
    items = list(iter_samples(_write(tmp_path / "s.tar", data[:cut])))
    raws, errors = _split_items(items)
    assert len(errors) == 1 and isinstance(items[-1], ShardReadError), (
        f"truncation at a block boundary is silent; yielded {[(r.key, sorted(r.members)) for r in raws]}"
    )
    # Cut between samples, the last sample read may have had more members: it is marked truncated, not intact.
    assert raws == samples[: len(raws)] and len(raws) >= 1
    assert [it.key for it in items[:-1]] == [s.key for s in samples[:2]] + (["s0002"] if member.endswith("png") else [])


def test_truncated_tar_inside_a_sample_first_member_yields_complete_samples_then_error(tmp_path):
    samples = _samples(5, noise=True)
    data = write_tar(samples)
    info = _member_offsets(data)["s0003.cls"]
    url = _write(tmp_path / "s.tar", data[: info.offset_data])  # header of s0003.cls present, its data cut
    items = list(iter_samples(url))
    raws, errors = _split_items(items)
    assert raws == samples[:3]
    assert len(errors) == 1 and items[-1] is errors[0]
    assert "s0003" in errors[0].message


def test_truncated_tar_does_not_yield_the_partial_sample_at_the_cut(tmp_path):
    """A cut inside a sample's last member must not yield that sample with members missing."""
    samples = _samples(5, noise=True)
    data = write_tar(samples)
    info = _member_offsets(data)["s0003.png"]
    url = _write(tmp_path / "s.tar", data[: info.offset_data + info.size // 2])
    items = list(iter_samples(url))
    raws, errors = _split_items(items)
    assert len(errors) == 1 and isinstance(items[-1], ShardReadError)
    partial = [r.key for r, s in zip(raws, samples) if r != s]
    assert not partial, (
        f"incomplete samples yielded as samples: {partial} "
        f"(members {[sorted(r.members) for r in raws if r.key in partial]})"
    )
    assert raws == samples[:3]


def test_zero_byte_shard_yields_only_a_shard_read_error(tmp_path):
    url = _write(tmp_path / "empty.tar", b"")
    items = list(iter_samples(url))  # must not raise
    assert all(isinstance(i, ShardReadError) for i in items)
    assert len(items) == 1
    assert "start" in items[0].message


def test_not_a_tar_yields_a_shard_read_error(tmp_path):
    url = _write(tmp_path / "junk.tar", b"this is not a tar file at all" * 40)
    items = list(iter_samples(url))
    assert len(items) == 1 and isinstance(items[0], ShardReadError)


def test_missing_shard_yields_a_shard_read_error(tmp_path):
    items = list(iter_samples(str(tmp_path / "missing.tar")))
    assert len(items) == 1 and isinstance(items[0], ShardReadError)


def test_repeated_key_later_in_a_shard_yields_two_samples(tmp_path):
    a = RawSample("k1", {"png": _png(1), "cls": b"1"})
    b = RawSample("k2", {"png": _png(2), "cls": b"2"})
    a2 = RawSample("k1", {"png": _png(3), "cls": b"3"})
    got = list(iter_samples(_write(tmp_path / "s.tar", write_tar([a, b, a2]))))
    assert [g.key for g in got] == ["k1", "k2", "k1"]
    assert got[0] == a and got[2] == a2


def test_member_repeated_within_one_sample_keeps_the_first(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("k.cls", b"1"), ("k.cls", b"2"), ("k.png", b"p")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    got = list(iter_samples(_write(tmp_path / "s.tar", buf.getvalue())))
    assert got == [RawSample("k", {"cls": b"1", "png": b"p"})]


def test_shard_id_is_the_file_stem():
    assert shard_id("s3://bkt/raw/train-000123.tar") == "train-000123"
    assert shard_id("/data/x/shard.v2.tar") == "shard.v2"
    assert shard_id("/data/x/train-000001.tar/") == "train-000001"
    assert shards.shard_id("relative/foo.tgz") == "foo"


# ---------------------------------------------------------------------------------------------------- manifest


def _rows() -> list[dict]:
    return [
        manifest.row(
            "s0",
            "shard-a",
            "protected",
            label=3,
            width=28,
            height=28,
            source_sha256="aa",
            output_sha256="bb",
            output_member="s0.png",
            linf=8,
            l2=1.5,
            psnr=38.25,
        ),
        manifest.row("s1", "shard-a", "rejected", error="no label member '.cls'", source_sha256="cc"),
    ]


def test_manifest_round_trip_with_design_columns_in_order(tmp_path):
    assert manifest.PUBLIC_SCHEMA.names == DESIGN_COLUMNS
    data = manifest.to_parquet(_rows())
    table = manifest.from_parquet(data)
    assert table.column_names == DESIGN_COLUMNS
    assert table.to_pylist() == [{k: v for k, v in r.items() if k != "source_sha256"} for r in _rows()]
    # readable by plain pyarrow from a file
    path = _write(tmp_path / "shard-a.parquet", data)
    plain = pq.read_table(path)
    assert plain.column_names == DESIGN_COLUMNS
    assert plain.schema.field("label").type == pa.int64()
    assert plain.schema.field("linf").type == pa.int64()
    assert plain.schema.field("psnr").type == pa.float64()
    assert plain.column("status").to_pylist() == ["protected", "rejected"]


def test_a_process_that_read_a_manifest_exits_cleanly(tmp_path):
    """Twelve fresh processes each read a shard's manifest and keep the table, untouched, to the end: every one exits
    0. (Read through ``pq.read_table``, about one in three aborted at interpreter exit with 'terminate called without
    an active exception', after their work was done.)"""
    import subprocess
    import sys

    path = _write(tmp_path / "shard-a.parquet", manifest.to_parquet(_rows()))
    script = (
        "from pipeline.storage import manifest\n"
        f"table = manifest.from_parquet(open({str(path)!r}, 'rb').read())\n"
    )  # nothing more: using the table before exit (printing it) hid the abort
    for _ in range(12):
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60, check=False
        )  # the exit status is the assertion
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_manifest_row_rejects_unknown_columns():
    with pytest.raises(ValueError, match="bogus"):
        manifest.row("k", "s", "protected", bogus=1)


def test_manifest_holds_source_hashes_only_when_asked():
    rows = [manifest.row("k", "s", "rejected", error="x", source_sha256="ab" * 32)]
    assert "source_sha256" not in manifest.from_parquet(manifest.to_parquet(rows)).column_names
    table = manifest.from_parquet(manifest.to_parquet(rows, source_hash=True))
    assert table.column_names == DESIGN_COLUMNS[:7] + ["source_sha256"] + DESIGN_COLUMNS[7:]
    assert table.column("source_sha256").to_pylist() == ["ab" * 32]
    merged = manifest.from_parquet(_merged([manifest.to_parquet(rows, source_hash=True)] * 2, source_hash=True))
    assert merged.column("source_sha256").to_pylist() == ["ab" * 32] * 2


def test_manifest_row_fills_missing_columns_with_none():
    r = manifest.row("k", "s", "rejected", error="x")
    assert list(r) == manifest.COLUMNS
    assert r["label"] is None and r["error"] == "x"


def _merged(parts, source_hash: bool = False) -> bytes:
    buf = io.BytesIO()
    manifest.merge(iter(parts), buf, source_hash)
    return buf.getvalue()


def test_manifest_merge_keeps_all_rows_in_order_and_streams_a_shard_at_a_time():
    part1 = manifest.to_parquet(_rows())
    part2 = manifest.to_parquet([manifest.row("t0", "shard-b", "protected", label=1)])
    part3 = manifest.to_parquet([])
    data = _merged([part2, part3, part1])
    merged = manifest.from_parquet(data)
    assert merged.column_names == DESIGN_COLUMNS
    assert merged.column("key").to_pylist() == ["t0", "s0", "s1"]
    assert merged.column("shard").to_pylist() == ["shard-b", "shard-a", "shard-a"]
    # Written as each shard's manifest came (one row group each), never as one table of every row.
    assert pq.ParquetFile(io.BytesIO(data)).num_row_groups == 3


def test_manifest_merge_of_nothing_is_an_empty_manifest():
    table = manifest.from_parquet(_merged([]))
    assert table.num_rows == 0 and table.column_names == DESIGN_COLUMNS


def test_writing_commits_whole_or_leaves_nothing(tmp_path):
    url = str(tmp_path / "out" / "big.parquet")
    with fs.writing(url) as f:
        f.write(b"a" * 1000)
        assert not os.path.exists(url)  # nothing visible before the block ends
    assert fs.read_bytes(url) == b"a" * 1000 and oct(os.stat(url).st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError), fs.writing(url) as f:
        f.write(b"b" * 10)
        raise RuntimeError("cut short")
    assert fs.read_bytes(url) == b"a" * 1000  # the old object stays whole
    assert os.listdir(tmp_path / "out") == ["big.parquet"]  # no temp file left


# ---------------------------------------------------------------------------------------------------- markers


def test_marker_is_done_only_with_the_same_config_hash(tmp_path):
    url = str(tmp_path / "shard_stats.json")
    markers.write_marker(url, "hash-a", samples=3, sha256="ff")
    assert markers.is_done(url, "hash-a")
    assert not markers.is_done(url, "hash-b")
    assert markers.read_marker(url) == {"config_hash": "hash-a", "samples": 3, "sha256": "ff"}


def test_missing_marker_reads_none_and_is_not_done(tmp_path):
    url = str(tmp_path / "nope.json")
    assert markers.read_marker(url) is None
    assert not markers.is_done(url, "h")


def test_torn_marker_counts_as_absent(tmp_path):
    url = str(tmp_path / "m.json")
    markers.write_marker(url, "h", samples=10)
    with open(url, "rb") as f:
        full = f.read()
    for cut in (0, 1, len(full) // 2, len(full) - 1):
        _write(url, full[:cut])
        assert markers.read_marker(url) is None
        assert not markers.is_done(url, "h")


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"config_hash": ', b"\x80\x81\xfe garbage", b"[1, 2]", b'"done"'],
    ids=["text", "torn-object", "non-utf8", "json-list", "json-string"],
)
def test_invalid_marker_counts_as_absent(tmp_path, content):
    url = _write(tmp_path / "m.json", content)
    assert not markers.is_done(url, "h")  # must not raise: an invalid marker is simply not done


# ---------------------------------------------------------------------------------------------------- layout


def test_default_work_dir_is_output_dot_work():
    assert default_work_dir("/data/protected") == "/data/protected.work"
    assert default_work_dir("/data/protected/") == "/data/protected.work"
    assert default_work_dir("s3://bkt/protected") == "s3://bkt/protected.work"
    assert default_work_dir("s3://bkt/runs/protected/") == "s3://bkt/runs/protected.work"


@pytest.mark.parametrize("output", ["s3://bkt", "s3://bkt/"])
def test_bucket_root_output_needs_a_work_dir(output):
    with pytest.raises(ValueError, match="--work-dir"):
        default_work_dir(output)


@pytest.mark.parametrize(
    "output, work",
    [
        ("/d/out", "/d/out/work"),
        ("/d/out/", "/d/out/.work"),
        ("s3://bkt/out", "s3://bkt/out/w"),
        ("/d/out/inner", "/d/out"),  # output inside the work dir
        ("s3://bkt/work/out", "s3://bkt/work/"),
        ("/d/out", "/d/out/"),  # the same folder
    ],
)
def test_check_work_dir_outside_refuses_overlap(output, work):
    with pytest.raises(ValueError, match="overlaps"):
        check_work_dir_outside(output, work)


@pytest.mark.parametrize(
    "output, work",
    [
        ("/d/out", "/d/out.work"),
        ("/d/out", "/d/out2"),
        ("/d/out.work", "/d/out"),
        ("s3://bkt", "s3://other/w"),
        ("s3://bkt/out", "s3://bkt/work"),
    ],
)
def test_check_work_dir_outside_accepts_siblings(output, work):
    check_work_dir_outside(output, work)


def test_layout_shard_files_live_in_output_and_round_files_in_work():
    lay = Layout("s3://bkt/out", "s3://bkt/out.work")
    assert lay.shard_tar("train-000001") == "s3://bkt/out/train-000001.tar"
    assert lay.shard_manifest("train-000001") == "s3://bkt/out/train-000001.parquet"
    assert lay.shard_marker("train-000001") == "s3://bkt/out/train-000001_stats.json"
    assert lay.manifest == "s3://bkt/out/manifest.parquet"
    assert lay.success == "s3://bkt/out/_SUCCESS.json"
    assert lay.run_record == "s3://bkt/out.work/run.json"
    assert lay.plan == "s3://bkt/out.work/plan.parquet"
    assert lay.round_dir(3) == "s3://bkt/out.work/round-0003"
    assert lay.checkpoint(12).startswith("s3://bkt/out.work/round-0012/")
    assert lay.noise_state(1, "train-000001").startswith("s3://bkt/out.work/round-0001/")
    assert lay.noise_state(1, "train-000001").endswith("train-000001.pt")
    assert lay.round_marker(1).startswith("s3://bkt/out.work/round-0001/")
    work_files = [
        lay.run_record,
        lay.plan,
        lay.probe_record,
        lay.round_dir(0),
        lay.checkpoint(0),
        lay.noise_state(0, "x"),
        lay.round_marker(0),
    ]
    assert not any(f.startswith("s3://bkt/out/") for f in work_files)


def test_verify_compares_the_merged_manifest_a_batch_at_a_time():
    from pipeline.inspection import _MergedCheck

    rows = [manifest.row(f"k{i}", f"s{i // 70_000}", "protected", label=i % 10) for i in range(140_001)]
    data = _merged([manifest.to_parquet(rows[:70_000]), manifest.to_parquet(rows[70_000:])])
    merged = manifest.from_parquet(data)
    check = _MergedCheck(pq.ParquetFile(io.BytesIO(data)))  # batches of 65,536 rows: the shards cross them
    check.expect(merged.slice(0, 70_000))
    check.expect(merged.slice(70_000))
    assert check.finish() == []
    check = _MergedCheck(pq.ParquetFile(io.BytesIO(data)))
    check.expect(merged.slice(0, 70_000))
    changed = merged.slice(70_000).to_pylist()
    changed[30_000]["label"] = 99
    check.expect(pa.Table.from_pylist(changed, schema=merged.schema))
    assert check.finish() == [
        ("manifest.parquet row 100000 (key 'k100000', shard s1) differs from its shard's manifest in: label")
    ]
    check = _MergedCheck(pq.ParquetFile(io.BytesIO(data)))
    check.expect(merged.slice(0, merged.num_rows - 1))
    assert check.finish() == ["manifest.parquet has 140001 rows, the shards 140000"]
    # A column the shard's rows have and the merged ones lack is a difference too (named), not a mismatch of schemas.
    check = _MergedCheck(pq.ParquetFile(io.BytesIO(data)))
    check.expect(merged.append_column("extra", pa.array([1] * merged.num_rows)))
    assert check.finish() == ["manifest.parquet row 0 (key 'k0', shard s0) differs from its shard's manifest in: extra"]
    # A row group that does not decode behind a footer that does: a problem, not an exception out of verify.
    damaged = bytearray(data)
    for i in range(200, 4000):
        damaged[i] ^= 0x5A
    check = _MergedCheck(pq.ParquetFile(io.BytesIO(bytes(damaged))))
    check.expect(merged)
    assert check.finish()[0].startswith("manifest.parquet unreadable (")


def test_verify_on_processes_gives_the_verdict_of_one_process(tmp_path, monkeypatch):
    """A release of 40 shards (benchmarks/scale.py's, written with the pipeline's own writers) checked on two spawned
    processes, a chunk of shards each: the same results in the same order as in this process, and a tampered shard
    is found the same way."""
    import importlib.util

    from pipeline import inspection

    spec = importlib.util.spec_from_file_location("scale", os.path.join(REPO, "benchmarks", "scale.py"))
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    scale.build(str(tmp_path), 40, 3)
    layout = Layout(str(tmp_path / "release"), str(tmp_path / "work"))
    ids = [f"s{i:06d}" for i in range(40)]
    tar = layout.shard_tar("s000017")
    with open(tar, "r+b") as f:  # one byte of a released image's data
        f.seek(600)
        byte = f.read(1)
        f.seek(600)
        f.write(bytes([byte[0] ^ 0xFF]))
    here = list(inspection._each_shard(layout, ids, scale.CHASH, 8, "png", processes=1))
    monkeypatch.setattr(inspection, "PARALLEL_FROM", 1)
    spawned = list(inspection._each_shard(layout, ids, scale.CHASH, 8, "png", processes=2))
    assert spawned == here and [s for s, _ in here] == ids
    assert [s for s, (found, _, _) in here if found] == ["s000017"]
    assert here[17][1][0][0] == "s000017.tar does not match its marker (size or sha256)"


def test_status_and_verify_run_without_importing_torch_or_ray(tmp_path):
    """``unlearnable status`` and ``verify`` of a finished release (benchmarks/scale.py's, 3 shards) in a fresh
    process: exit 0, and neither torch nor Ray (nor webdataset, which imports torch) is imported on the way."""
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("scale", os.path.join(REPO, "benchmarks", "scale.py"))
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    scale.build(str(tmp_path), 3, 4)
    scale.step(str(tmp_path), "merge")  # the merged manifest and _SUCCESS.json: a finished release
    success_path = tmp_path / "release" / "_SUCCESS.json"
    success = json.loads(success_path.read_text())  # with the run's record that status reports
    protection = {"holds": True, "probe_accuracy": 0.1, "threshold": 0.3}
    success.update(rounds=1, stop_reason="stop_rule", surrogate_error=0.0, protection=protection)
    success_path.write_text(json.dumps(success))
    script = (
        "import json, sys\n"
        "from pipeline.cli import main\n"
        f"codes = [main(['status', {str(tmp_path / 'release')!r}, '--work-dir', {str(tmp_path / 'work')!r}]),"
        f" main(['verify', {str(tmp_path / 'release')!r}])]\n"
        "print(json.dumps({'codes': codes, 'imported': [m for m in ('torch', 'ray', 'webdataset') if m in sys.modules]}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )  # the exit status is checked below
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0], "imported": []}, (result, proc.stdout[-2000:], proc.stderr[-2000:])
    assert ": complete" in proc.stdout and "OK: " in proc.stdout


def test_status_counts_each_stage_from_its_markers(tmp_path):
    """``status`` of a run in round 1's noise stage (2 of 3 shards done), then in its export stage (1 shard exported,
    1 released with a read error); markers of another run's config hash count as absent."""
    from pipeline.inspection import status
    from pipeline.plan import Plan, ShardPlan

    layout = Layout(str(tmp_path / "out"), str(tmp_path / "out.work"))
    ids = ["a", "b", "c"]
    plan = Plan(tuple(ShardPlan(s, f"/in/{s}.tar", 10) for s in ids), 10, 1)
    fs.write_bytes(layout.plan, plan.to_parquet())
    config = {"mode": "samplewise", "max_rounds": 5}
    fs.write_bytes(layout.run_record, json.dumps({"config": config, "config_hash": "h"}).encode())
    markers.write_marker(layout.round_marker(0), "h", round=0, error=0.5, stop=False, seconds={"noise": 2.0})
    markers.write_marker(layout.train_marker(1), "h")
    markers.write_marker(layout.noise_marker(1, "a"), "h")
    markers.write_marker(layout.noise_marker(1, "b"), "h")
    markers.write_marker(layout.noise_marker(1, "c"), "another run")
    info = status(layout.output, layout.work)
    assert (info["state"], info["rounds_done"], info["round"], info["stage"]) == ("in progress", 1, 1, "noise")
    assert info["shards"] == {"total": 3, "done": 2, "left": 1, "failed": 0}
    assert info["last_error_on_released_data"] == 0.5

    markers.write_marker(layout.round_marker(1), "h", round=1, error=0.0, stop=True, seconds={"noise": 2.0})
    markers.write_marker(layout.shard_marker("b"), "h", read_error=None)
    markers.write_marker(layout.shard_marker("c"), "h", read_error="c.tar: truncated")
    info = status(layout.output, layout.work)
    assert info["stage"] == "export" and info["shards"] == {"total": 3, "done": 2, "left": 1, "failed": 1}
