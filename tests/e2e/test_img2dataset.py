"""An img2dataset output folder, read as it is: ``<shard>.tar`` shards of ``.jpg`` + ``.txt`` (caption) + ``.json``
(the class name under ``label``) beside ``<shard>.parquet`` and ``<shard>_stats.json`` sidecars, built from real MNIST
digits. ``protect --label-key json:label --encode-format jpeg`` protects every sample into a JPEG release, keeps the
captions and JSON byte for byte, and labels the manifest with the sorted vocabulary's ids; without a usable label
the run is refused at plan time."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image

from pipeline.storage.shards import RawSample, write_tar

ARGS = [
    "--resolution",
    "28",
    "--pgd-steps",
    "2",
    "--step-size",
    "2/255",
    "--train-steps",
    "3",
    "--batch-size",
    "64",
    "--probe-arch",
    "small-cnn",
    "--probe-steps",
    "10",
    "--probe-countermeasures",
    "none",
    "--max-rounds",
    "1",
    "--stop-error",
    "1.0",
]
# Class names whose sorted order is not the digits' order, so an id that is the digit itself would be caught.
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _img2dataset_folder(mnist_small, folder, labelled: bool = True) -> dict[str, dict]:
    """The MNIST train shards rewritten the way img2dataset writes its output (the class name in the JSON's
    ``label`` when ``labelled``); returns each key's members."""
    os.makedirs(folder)
    samples: dict[str, dict] = {}
    for s, url in enumerate(mnist_small["train"]):
        shard, rows = [], []
        with tarfile.open(url) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for i, key in enumerate(sorted({n.rsplit(".", 1)[0] for n in files})):
            digit = int(files[f"{key}.cls"])
            buf = io.BytesIO()
            Image.open(io.BytesIO(files[f"{key}.png"])).convert("RGB").save(buf, format="JPEG", quality=95)
            new_key = f"{s:05d}{i:04d}"
            url_ = f"https://example.com/mnist/{key}.jpg"
            meta = {
                "url": url_,
                "key": new_key,
                "status": "success",
                "error_message": None,
                "width": 28,
                "height": 28,
                **({"label": NAMES[digit]} if labelled else {}),
            }
            members = {
                "jpg": buf.getvalue(),
                "txt": f"a handwritten {NAMES[digit]}".encode(),
                "json": json.dumps(meta).encode(),
            }
            shard.append(RawSample(new_key, members))
            samples[new_key] = {"digit": digit, **members}
            rows.append({"url": url_, "key": new_key, "status": "success"})
        with open(os.path.join(folder, f"{s:05d}.tar"), "wb") as f:
            f.write(write_tar(shard))
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"{s:05d}.parquet"))
        with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": len(rows), "successes": len(rows), "failed_to_download": 0}, f)
    return samples


@pytest.fixture(scope="module")
def i2d_run(mnist_small, tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("img2dataset")
    folder = str(root / "i2d")
    samples = _img2dataset_folder(mnist_small, folder)
    out = str(root / "release")
    proc = run_cli(
        "protect",
        "--input",
        folder,
        "--output",
        out,
        "--label-key",
        "json:label",
        "--encode-format",
        "jpeg",
        "--encode-quality",
        "92",
        *ARGS,
        ray_address=ray_cluster,
    )
    rows = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist() if proc.returncode in (0, 4) else []
    return {"proc": proc, "out": out, "folder": folder, "samples": samples, "rows": rows}


def test_every_sample_is_protected_with_its_vocabulary_id(i2d_run):
    proc, rows, samples = i2d_run["proc"], i2d_run["rows"], i2d_run["samples"]
    assert proc.returncode in (0, 4), proc.stderr[-4000:]
    assert len(rows) == len(samples) == 300
    assert {r["status"] for r in rows} == {"protected"}, [r["error"] for r in rows if r["error"]][:3]
    vocabulary = sorted(NAMES)
    assert {r["key"]: r["label"] for r in rows} == {k: vocabulary.index(NAMES[s["digit"]]) for k, s in samples.items()}
    with open(os.path.join(i2d_run["out"], "_SUCCESS.json")) as f:
        success = json.load(f)
    assert success["config"]["label_names"] == vocabulary  # the release says what each id means
    assert success["counts"] == {"input": 300, "protected": 300, "rejected": 0}
    assert success["config"]["encode_format"] == "jpeg" and success["config"]["encode_quality"] == 92


def test_captions_and_json_are_released_byte_identical_beside_the_protected_jpeg(i2d_run):
    samples, seen = i2d_run["samples"], set()
    rows = {r["key"]: r for r in i2d_run["rows"]}
    for shard in ("00000", "00001", "00002"):
        with tarfile.open(os.path.join(i2d_run["out"], f"{shard}.tar")) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            assert ext in ("jpg", "txt", "json"), name
            if ext != "jpg":
                assert data == samples[key][ext], name
            else:
                # A new JPEG (not the original's bytes), whose decoded pixels the manifest measured.
                assert data != samples[key]["jpg"] and rows[key]["output_member"] == name
                released = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)
                original = np.asarray(Image.open(io.BytesIO(samples[key]["jpg"])), dtype=np.int16)
                assert rows[key]["linf"] == np.abs(released - original).max() > 0
            seen.add(name)
    assert seen == {f"{k}.{e}" for k in samples for e in ("jpg", "txt", "json")}


def test_the_sidecars_are_not_read_as_shards(i2d_run):
    rows, out = i2d_run["rows"], i2d_run["out"]
    assert {r["shard"] for r in rows} == {"00000", "00001", "00002"}
    assert sorted(os.listdir(out)) == sorted(
        ["_SUCCESS.json", "manifest.parquet"]
        + [f"0000{s}{ext}" for s in range(3) for ext in (".tar", ".parquet", "_stats.json")]
    )
    assert run_cli("verify", out).returncode == 0


def test_a_corpus_without_a_usable_label_is_refused_in_one_line_before_ray_starts(i2d_run, tmp_path):
    out = str(tmp_path / "refused")
    expected = "unlearnable: no sample has a usable label under --label-key cls (no label member '.cls')"
    for extra in (["--dry-run"], []):
        proc = run_cli("protect", "--input", i2d_run["folder"], "--output", out, *ARGS, *extra, timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(expected), last
        assert "--label-key json:FIELD (fields seen: error_message, height, key, label, status, url, width)" in last
        assert "Traceback" not in proc.stderr and "Ray" not in proc.stderr and proc.stdout == ""
        assert not os.path.exists(out)  # nothing written


def test_the_same_shards_unlabelled_are_protected_with_labels_cluster(mnist_small, tmp_path, ray_cluster):
    """No label anywhere (the JSON without its class): ``--labels cluster --num-classes 10`` groups the digits by
    k-means and protects every sample; the captions and JSON are released byte for byte; the manifest's label is the
    sample's cluster. The run never reports the release protected: its probe learns the clusters, not the classes
    (exit 4, 'not certified')."""
    folder = str(tmp_path / "unlabelled")
    samples = _img2dataset_folder(mnist_small, folder, labelled=False)
    out = str(tmp_path / "release")
    args = ["--input", folder, "--output", out, "--labels", "cluster", "--num-classes", "10", *ARGS]
    proc = run_cli("protect", *args, ray_address=ray_cluster)
    assert proc.returncode == 4, proc.stderr[-4000:]
    assert "--labels cluster: 10 groups (k-means" in proc.stderr and "PROTECTION NOT CERTIFIED" in proc.stderr
    rows = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    assert len(rows) == 300 and {r["status"] for r in rows} == {"protected"}
    clusters = [r["label"] for r in rows]
    assert set(clusters) <= set(range(10)) and len(set(clusters)) >= 8
    for shard in ("00000", "00001", "00002"):
        with tarfile.open(os.path.join(out, f"{shard}.tar")) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext in ("png", "txt", "json") and (
                    ext == "png" or tar.extractfile(m).read() == samples[key][ext]
                ), m.name
    with open(os.path.join(out, "_SUCCESS.json")) as f:
        success = json.load(f)
    assert success["config"]["labels"] == "cluster" and success["hashed_config"]["labels"] == "cluster"
    p = success["protection"]
    assert p["holds"] is False and p["certified"] is False and "clusters, not the classes" in p["why"]
    assert run_cli("verify", out).returncode == 0
    assert not os.path.exists(out + ".work")  # the centroids went with the rest of the work dir
