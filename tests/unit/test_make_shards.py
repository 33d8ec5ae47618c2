"""``make-shards``: flat and nested folders, labels from the top-level sub-folder or none, deterministic bytes, an S3
source and output (the real SeaweedFS server), memory bounded by a file rather than the corpus, and the CLI's
refusals (exit 2, one line)."""

from __future__ import annotations

import io
import json
import logging
import os
import tracemalloc

import pytest
from conftest import make_bucket, run_cli, upload_dir
from PIL import Image

from pipeline.storage import fs
from pipeline.storage.shards import RawSample, iter_samples, write_tar
from tools import make_shards as make_shards_module
from tools.make_shards import make_shards


def _img_bytes(value: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), (value % 256, 2 * value % 256, 3 * value % 256)).save(buf, format=fmt)
    return buf.getvalue()


def _write(root, rel: str, data: bytes | None = None) -> bytes:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = _img_bytes(len(rel) * 7 + sum(map(ord, rel)), "JPEG" if rel.endswith(".jpg") else "PNG")
    path.write_bytes(data)
    return data


def _image_folder(root, layout: dict[str, list[str]]) -> None:
    for cls, names in layout.items():
        for name in names:
            _write(root, f"{cls}/{name}")


def _samples(report: dict) -> list[RawSample]:
    got = [s for url in report["shards"] for s in iter_samples(url)]
    assert all(isinstance(s, RawSample) for s in got), got
    return got


def _tree(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


# ---------------------------------------------------------------------------------------------------- labels: folders


def test_labels_are_the_classes_in_sorted_folder_order(tmp_path):
    src = tmp_path / "src"
    _image_folder(src, {"zebra": ["a.png", "b.png"], "ant": ["c.png", "d.jpg", "e.png"]})
    _write(src, ".DS_Store", b"hidden")  # hidden names are skipped, at the root too
    report = make_shards(str(src), str(tmp_path / "out"), per_shard=1000)
    assert report["samples"] == 5 and report["classes"] == 2 and len(report["shards"]) == 1
    got = _samples(report)
    assert {s.key: s.members["cls"] for s in got} == {
        "ant_c": b"0",
        "ant_d": b"0",
        "ant_e": b"0",
        "zebra_a": b"1",
        "zebra_b": b"1",
    }
    by_key = {s.key: s for s in got}
    assert by_key["ant_d"].members["jpg"] == (src / "ant" / "d.jpg").read_bytes()  # bytes kept as they are
    assert by_key["zebra_b"].members["png"] == (src / "zebra" / "b.png").read_bytes()


def test_per_shard_is_respected_and_classes_json_is_written(tmp_path):
    src = tmp_path / "src"
    _image_folder(src, {"cat": ["1.png", "2.png", "3.png"], "dog": ["4.png", "5.png"]})
    out = tmp_path / "out"
    report = make_shards(str(src), str(out), per_shard=2)
    assert [os.path.basename(u) for u in report["shards"]] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert [len(list(iter_samples(u))) for u in report["shards"]] == [2, 2, 1]
    assert json.loads((out / "classes.json").read_text()) == {"0": "cat", "1": "dog"}
    # No temp file is left beside the shards.
    assert sorted(os.listdir(out)) == ["classes.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_files_with_the_same_stem_stay_separate_samples(tmp_path):
    """``x.png`` and ``x.jpg`` (or ``a.b.png`` and ``a_b.png``) in one class must not collapse into one sample."""
    src = tmp_path / "src"
    _image_folder(src, {"cat": ["x.jpg", "x.png", "a.b.png", "a_b.png"], "dog": ["y.png"]})
    report = make_shards(str(src), str(tmp_path / "out"))
    keys = [s.key for s in _samples(report)]
    assert len(keys) == report["samples"] == 5, f"reported {report['samples']} samples, shard holds keys {keys}"
    assert len(set(keys)) == len(keys), f"duplicate keys {keys}"


def test_nested_folders_take_the_label_of_their_top_level_folder(tmp_path):
    src = tmp_path / "src"
    for rel in ["dog/x/y/z.jpg", "cat/indoor/a.png", "cat/b.png", "cat/indoor/old.v2.png", "cat-2/c.png"]:
        _write(src, rel)
    _write(src, "cat/.cache/thumb.png")  # a hidden folder deep down is skipped with everything in it
    _write(src, ".git/objects/ab", b"not data")
    out = tmp_path / "out"
    report = make_shards(str(src), str(out), per_shard=2)
    got = _samples(report)
    # Sorted by relative path folder by folder: cat/b.png, cat/indoor/..., then cat-2/, then dog/.
    assert [s.key for s in got] == ["cat_b", "cat_indoor_a", "cat_indoor_old_v2", "cat-2_c", "dog_x_y_z"]
    assert [s.members["cls"] for s in got] == [b"0", b"0", b"0", b"1", b"2"]
    assert json.loads((out / "classes.json").read_text()) == {"0": "cat", "1": "cat-2", "2": "dog"}
    assert got[-1].members["jpg"] == (src / "dog/x/y/z.jpg").read_bytes()
    assert report == {"shards": report["shards"], "samples": 5, "classes": 3, "labels": "folders"}


# ---------------------------------------------------------------------------------------------------- labels: none


def test_a_flat_folder_with_labels_none_keeps_every_file_byte_identical_and_no_cls(tmp_path):
    src = tmp_path / "flat"
    files = {f"img{i:02d}.png": _write(src, f"img{i:02d}.png") for i in range(7)}
    files["photo.JPG"] = _write(src, "photo.JPG", _img_bytes(3, "JPEG"))
    files["notes.txt"] = _write(src, "notes.txt", b"not an image, passed as it is")
    files["blob"] = _write(src, "blob", b"\x00\x01 no extension")
    _write(src, ".hidden.png")
    out = tmp_path / "out"
    report = make_shards(str(src), str(out), per_shard=3, labels="none")
    got = _samples(report)
    assert report["samples"] == len(got) == len(files) and report["classes"] is None
    assert all("cls" not in s.members and len(s.members) == 1 for s in got)
    by_key = {s.key: s.members for s in got}
    assert by_key["photo"] == {"jpg": files["photo.JPG"]}
    assert by_key["notes"] == {"txt": files["notes.txt"]}
    assert by_key["blob"] == {"bin": files["blob"]}
    for i in range(7):
        assert by_key[f"img{i:02d}"] == {"png": files[f"img{i:02d}.png"]}
    assert not (out / "classes.json").exists()


def test_labels_none_walks_nested_folders_with_keys_from_the_whole_path(tmp_path):
    src = tmp_path / "src"
    data = {rel: _write(src, rel) for rel in ["2024/06/a.png", "2024/a.png", "b.png"]}
    got = _samples(make_shards(str(src), str(tmp_path / "out"), labels="none"))
    assert [(s.key, s.members) for s in got] == [
        ("2024_06_a", {"png": data["2024/06/a.png"]}),
        ("2024_a", {"png": data["2024/a.png"]}),
        ("b", {"png": data["b.png"]}),
    ]


# ---------------------------------------------------------------------------------------------------- determinism


def test_two_runs_give_the_same_bytes_as_write_tar_would(tmp_path):
    src = tmp_path / "src"
    _image_folder(src, {"b": ["3.png", "1.jpg", "2.png"], "a": ["z.png", "y.png"], "c": ["q.webp.png"]})
    first = make_shards(str(src), str(tmp_path / "one"), per_shard=4)
    second = make_shards(str(src), str(tmp_path / "two"), per_shard=4)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two") and len(first["shards"]) == 2
    # The incremental writer gives exactly the bytes of the storage layer's one-shot writer for the same samples.
    for url in first["shards"]:
        assert fs.read_bytes(url) == write_tar(list(iter_samples(url)))
    assert [os.path.basename(u) for u in second["shards"]] == ["shard-000000.tar", "shard-000001.tar"]


# ---------------------------------------------------------------------------------------------------- S3


def test_an_s3_prefix_shards_to_an_s3_prefix_like_a_folder_to_a_folder(s3_env, tmp_path):
    src = tmp_path / "src"
    for rel in ["dog/d1.png", "dog/d2.jpg", "cat/c1.png", "cat/c2.png", "cat/c3.png", "cat/.hidden.png"]:
        _write(src, rel)
    make_bucket(s3_env, "make-shards")
    for cls in ("cat", "dog"):  # upload_dir takes one folder's files (hidden ones too: the walk must skip them)
        upload_dir(s3_env, str(src / cls), f"s3://make-shards/raw/{cls}")
    local = make_shards(str(src), str(tmp_path / "local"), per_shard=2)
    remote = make_shards("s3://make-shards/raw/", "s3://make-shards/shards", per_shard=2)
    assert remote["shards"] == [f"s3://make-shards/shards/shard-{i:06d}.tar" for i in range(3)]
    assert remote["samples"] == local["samples"] == 5 and remote["classes"] == 2
    for here, there in zip(local["shards"], remote["shards"], strict=True):
        assert fs.read_bytes(there) == fs.read_bytes(here)
    assert json.loads(fs.read_bytes("s3://make-shards/shards/classes.json")) == {"0": "cat", "1": "dog"}
    assert fs.listdir("s3://make-shards/shards") == [
        "classes.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    # A source prefix with files straight under it is refused with --labels folders, taken with --labels none.
    upload_dir(s3_env, str(src / "cat"), "s3://make-shards/flat")
    with pytest.raises(ValueError, match="--labels none"):
        make_shards("s3://make-shards/flat", str(tmp_path / "flat-out"))
    flat = make_shards("s3://make-shards/flat", str(tmp_path / "flat-out"), labels="none")
    assert [s.key for s in _samples(flat)] == ["c1", "c2", "c3"]
    with pytest.raises(ValueError, match="does not exist"):
        make_shards("s3://make-shards/nothing-here", str(tmp_path / "x"))


# ---------------------------------------------------------------------------------------------------- bounded memory


def test_memory_stays_bounded_by_a_file_not_by_the_corpus_or_a_shard(tmp_path):
    """40 MiB of files into shards of 5: the peak of Python's allocations (measured: about two files' worth, 1.1 MiB)
    stays below one shard's contents (2.5 MiB), let alone the corpus (the whole-corpus version peaked at 43 MiB)."""
    src = tmp_path / "src"
    file_size, n_files, per_shard = 512 * 1024, 80, 5
    for i in range(n_files):
        _write(src, f"c{i % 4}/f{i:03d}.bin", os.urandom(file_size))
    corpus = file_size * n_files
    tracemalloc.start()
    try:
        report = make_shards(str(src), str(tmp_path / "out"), per_shard=per_shard)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["samples"] == n_files and len(report["shards"]) == 16
    assert sum(os.path.getsize(u) for u in report["shards"]) > corpus  # every byte really went through
    assert peak < per_shard * file_size, f"peak {peak / 2**20:.1f} MiB while sharding {corpus / 2**20:.0f} MiB"


def test_progress_is_logged_every_few_shards(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(make_shards_module, "PROGRESS_EVERY", 2)
    src = tmp_path / "src"
    for i in range(5):
        _write(src, f"f{i}.png")
    with caplog.at_level(logging.INFO, logger="tools.make_shards"):
        make_shards(str(src), str(tmp_path / "out"), per_shard=1, labels="none")
    lines = [r.getMessage() for r in caplog.records if r.name == "tools.make_shards"]
    assert lines == [
        "make-shards: 2 shards, 2 samples written",
        "make-shards: 4 shards, 4 samples written",
        f"make-shards: 5 samples in 5 shards under {tmp_path / 'out'}",
    ]


# ---------------------------------------------------------------------------------------------------- refusals


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    flat = tmp_path / "flat"
    _write(flat, "a.png")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="holds files directly in it .*--labels none"):
        make_shards(str(flat), str(out))
    with pytest.raises(ValueError, match="--per-shard"):
        make_shards(str(flat), str(out), per_shard=0)
    with pytest.raises(ValueError, match="does not exist"):
        make_shards(str(tmp_path / "missing"), str(out))
    with pytest.raises(ValueError, match="not a folder"):
        make_shards(str(flat / "a.png"), str(out), labels="none")
    with pytest.raises(ValueError, match="--labels"):
        make_shards(str(flat), str(out), labels="subfolders")
    with pytest.raises(ValueError, match="inside SRC"):
        make_shards(str(flat), str(flat / "shards"), labels="none")
    hidden_only = tmp_path / "hidden-only"
    _write(hidden_only, ".a.png")
    _write(hidden_only, "cls/.b.png")
    with pytest.raises(ValueError, match="no files"):
        make_shards(str(hidden_only), str(out))
    with pytest.raises(ValueError, match="no files"):
        make_shards(str(hidden_only), str(out), labels="none")
    assert not out.exists()


@pytest.fixture(scope="module")
def cli_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _write(root / "flat", "a.png")
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize(
    "case, args, says",
    [
        ("missing source", ["{root}/missing", "{root}/out"], "does not exist"),
        ("empty source", ["{root}/empty", "{root}/out"], "holds no files"),
        ("per-shard 0", ["{root}/flat", "{root}/out", "--per-shard", "0", "--labels", "none"], "--per-shard"),
        ("files in the root", ["{root}/flat", "{root}/out"], "pass --labels none"),
    ],
)
def test_the_cli_refuses_bad_input_with_exit_2_and_one_line(cli_corpus, case, args, says):
    done = run_cli("make-shards", *[a.format(root=cli_corpus) for a in args], timeout=300)
    assert done.returncode == 2, (case, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.startswith("unlearnable:")]
    assert len(lines) == 1 and says in lines[0], (case, done.stderr)
    assert not (cli_corpus / "out").exists()


def test_the_cli_shards_a_flat_folder_with_labels_none(cli_corpus):
    done = run_cli(
        "make-shards", str(cli_corpus / "flat"), str(cli_corpus / "cli-out"), "--labels", "none", timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["samples"] == 1 and report["labels"] == "none" and report["classes"] is None
    assert [s.members for s in _samples(report)] == [{"png": (cli_corpus / "flat" / "a.png").read_bytes()}]
