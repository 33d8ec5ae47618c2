"""The originals are never touched: inputs, OUTPUT and WORK compared as resolved locations, credentials refused.

Each refusal is exit 2 with one line on stderr, before anything is written (no release, no work dir, the input
folder byte for byte as it was).
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.storage import fs
from pipeline.storage.shards import RawSample, write_tar


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def corpus(tmp_path) -> str:
    folder = tmp_path / "data" / "in"
    folder.mkdir(parents=True)
    for s in range(2):
        samples = [RawSample(f"s{s}-{i}", {"png": _png(10 * s + i), "cls": str(i % 2).encode()}) for i in range(4)]
        (folder / f"train-{s}.tar").write_bytes(write_tar(samples))
    return str(folder)


def _snapshot(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _refused(capsys, corpus: str, *args: str) -> str:
    before = _snapshot(os.path.dirname(corpus))
    code = main(["protect", "--resolution", "8", "--max-rounds", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("unlearnable: ") and "Traceback" not in err[0], err
    assert _snapshot(os.path.dirname(corpus)) == before, "a refused run wrote or removed something"
    return err[0]


def test_work_dir_equal_to_the_input_folder_is_refused(capsys, corpus, tmp_path):
    line = _refused(capsys, corpus, "--input", corpus, "--output", str(tmp_path / "out"), "--work-dir", corpus)
    assert "--work-dir" in line and "input" in line


def test_output_equal_to_the_input_is_refused(capsys, corpus):
    line = _refused(capsys, corpus, "--input", corpus, "--output", corpus)
    assert "--output" in line


def test_output_equal_to_the_input_under_another_spelling_is_refused(capsys, corpus, monkeypatch):
    monkeypatch.chdir(os.path.dirname(corpus))
    pattern = os.path.join(corpus, "train-{0..1}.tar")
    _refused(capsys, corpus, "--input", pattern, "--output", "in")
    _refused(capsys, corpus, "--input", pattern, "--output", os.path.join(corpus, "sub", "..") + "/")


def test_output_containing_an_input_shard_is_refused(capsys, corpus):
    line = _refused(capsys, corpus, "--input", os.path.join(corpus, "train-0.tar"), "--output", corpus)
    assert "input shard" in line


def test_work_dir_inside_the_output_under_another_spelling_is_refused(capsys, corpus, tmp_path, monkeypatch):
    out = tmp_path / "D" / "out"
    (tmp_path / "D" / "x").mkdir(parents=True)
    line = _refused(
        capsys,
        corpus,
        "--input",
        corpus,
        "--output",
        str(out),
        "--work-dir",
        str(tmp_path / "D" / "x" / ".." / "out" / "work"),
    )
    assert "overlaps the output" in line
    monkeypatch.chdir(tmp_path / "D")
    _refused(capsys, corpus, "--input", corpus, "--output", "out", "--work-dir", str(out / "work"))


def test_work_dir_reached_through_a_symlink_into_the_output_is_refused(capsys, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    _refused(capsys, corpus, "--input", corpus, "--output", str(out), "--work-dir", str(tmp_path / "link" / "w"))


def test_output_inside_the_input_folder_is_refused(capsys, corpus):
    line = _refused(capsys, corpus, "--input", corpus, "--output", os.path.join(corpus, "protected"))
    assert "input folder" in line


def test_input_folder_inside_the_work_dir_is_refused(capsys, corpus, tmp_path):
    _refused(
        capsys, corpus, "--input", corpus, "--output", str(tmp_path / "out"), "--work-dir", os.path.dirname(corpus)
    )


@pytest.mark.parametrize("flag", ["--input", "--output", "--work-dir"])
def test_credentials_in_a_url_are_refused_without_repeating_them(capsys, corpus, tmp_path, flag):
    urls = {"--input": corpus, "--output": str(tmp_path / "out"), "--work-dir": str(tmp_path / "w")}
    urls[flag] = "s3://AKIAEXAMPLEKEYID:s3cr3t-VALUE@bucket/prefix"
    line = _refused(capsys, corpus, *[x for k, v in urls.items() for x in (k, v)])
    assert "credentials" in line and flag in line
    assert "AKIAEXAMPLEKEYID" not in line and "s3cr3t-VALUE" not in line


def test_locations_compare_buckets_by_normalised_prefix():
    assert fs.overlaps(fs.location("s3://bkt/a/../out/"), fs.location("s3://bkt/out/work"))
    assert fs.overlaps(fs.location("s3://bkt//out"), fs.location("s3://bkt/out"))
    assert not fs.overlaps(fs.location("s3://bkt/out"), fs.location("s3://bkt/out.work"))
    assert not fs.overlaps(fs.location("s3://bkt/out"), fs.location("s3://other/out"))
    assert not fs.overlaps(fs.location("s3://bkt/out"), fs.location("gs://bkt/out"))


def test_release_files_are_world_readable(tmp_path):
    target = str(tmp_path / "release" / "x.parquet")
    fs.write_bytes(target, b"data")
    assert os.stat(target).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", ["manifest", "_SUCCESS", ".hidden"])
def test_a_shard_id_the_release_reserves_is_refused(capsys, corpus, name):
    os.rename(os.path.join(corpus, "train-1.tar"), os.path.join(corpus, f"{name}.tar"))
    line = _refused(capsys, corpus, "--input", corpus, "--output", os.path.join(os.path.dirname(corpus), "out"))
    assert f"{name!r}" in line and "reserves" in line


def test_output_inside_a_folder_named_by_a_brace_pattern_is_refused(capsys, corpus):
    other = os.path.join(os.path.dirname(corpus), "more")
    os.mkdir(other)
    os.rename(os.path.join(corpus, "train-1.tar"), os.path.join(other, "train-1.tar"))
    pattern = os.path.join(os.path.dirname(corpus), "{in,more}")
    line = _refused(capsys, corpus, "--input", pattern, "--output", os.path.join(corpus, "protected"))
    assert "input folder" in line


# ---------------------------------------------------------------------------------------------------- exit statuses


@pytest.mark.parametrize("resolution", ["1", "2"])
def test_a_working_resolution_no_surrogate_can_take_is_refused_in_one_line(capsys, corpus, tmp_path, resolution):
    line = _refused(capsys, corpus, "--input", corpus, "--output", str(tmp_path / "out"), "--resolution", resolution)
    assert "--resolution must be at least 8" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_an_output_that_is_a_file_is_refused(capsys, corpus, tmp_path):
    target = tmp_path / "release.txt"
    target.write_bytes(b"not a folder")
    line = _refused(capsys, corpus, "--input", corpus, "--output", str(target))
    assert "is a file, not a folder" in line
    assert target.read_bytes() == b"not a folder"


def test_an_output_below_a_file_is_a_permanent_storage_error_not_rerun_to_resume(capsys, corpus, tmp_path):
    target = tmp_path / "release.txt"
    target.write_bytes(b"not a folder")
    line = _refused(capsys, corpus, "--input", corpus, "--output", str(target / "out"))
    assert "NotADirectoryError" in line and "rerun the same command" not in line
    assert target.read_bytes() == b"not a folder"
