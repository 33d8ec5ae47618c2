"""A corpus from the wild: every kind of bad input beside good digits, through a real ``protect`` run.

The run must complete, every input sample must end in exactly one manifest row (``protected``, or ``rejected`` with
a clear error), odd formats that can be protected are converted and protected, and rejected samples are not released.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import raw_tar, run_cli
from PIL import Image, ImageCms

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
    "--probe-steps",
    "20",
    "--probe-arch",
    "small-cnn",
    "--probe-countermeasures",
    "none",
    "--max-rounds",
    "1",
    "--stop-error",
    "1.0",
    "--num-classes",
    "10",
]


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pattern(mode: str, size: tuple[int, int]) -> Image.Image:
    """A non-flat image (flat images hide channel and orientation mistakes)."""
    w, h = size
    ramp = (np.add.outer(np.arange(h) * 7, np.arange(w) * 3) % 200 + 20).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(ramp, mode="L")
    rgb = np.stack([ramp, 255 - ramp, (ramp // 2 + 60).astype(np.uint8)], axis=-1)
    img = Image.fromarray(rgb, mode="RGB")
    return img if mode == "RGB" else img.convert(mode)


def _odd_samples() -> tuple[list[RawSample], dict[str, tuple[str, str]]]:
    """Samples and, per key, the expected (status, error text or released PIL mode)."""
    s, want = [], {}

    def add(key, members, status, detail):
        s.append(RawSample(key, members))
        want.setdefault(key, (status, detail))

    cls = b"3"
    add("gray", {"png": _encode(_pattern("L", (28, 28))), "cls": cls, "txt": b"kept as it was"}, "protected", "L")
    rgba = _pattern("RGB", (20, 24)).convert("RGBA")
    alpha = np.full((24, 20), 255, np.uint8)
    alpha[:, :10] = 90
    rgba.putalpha(Image.fromarray(alpha, mode="L"))
    add("rgba", {"png": _encode(rgba), "cls": cls}, "protected", "RGBA")
    add(
        "palette",
        {"png": _encode(_pattern("RGB", (30, 30)).convert("P", palette=Image.Palette.ADAPTIVE)), "cls": cls},
        "protected",
        "RGB",
    )
    sixteen = Image.fromarray((np.add.outer(np.arange(16), np.arange(16)) * 2000).astype(np.uint16))
    add("png16", {"png": _encode(sixteen), "cls": cls}, "protected", "L")
    add("cmyk", {"jpg": _encode(_pattern("RGB", (32, 32)).convert("CMYK"), "JPEG"), "cls": cls}, "protected", "RGB")
    # A camera photo: rotated 90 degrees clockwise on display, where it was taken, the camera, XMP, an ICC profile.
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "CameraMaker"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Make="CameraMaker"/></rdf:RDF>'
    xmp += b"</x:xmpmeta>"
    add(
        "exif",
        {"jpg": _encode(_pattern("RGB", (40, 20)), "JPEG", exif=exif, xmp=xmp, icc_profile=SRGB), "cls": cls},
        "protected",
        "RGB",
    )
    add("wrongext", {"png": _encode(_pattern("RGB", (28, 28)), "JPEG"), "cls": cls}, "protected", "RGB")
    add("onepixel", {"png": _encode(Image.new("L", (1, 1), 200)), "cls": cls}, "protected", "L")
    add("notimage", {"png": b"this is not an image at all", "cls": cls}, "rejected", "undecodable")
    add("bomb", {"png": _encode(Image.new("L", (8000, 8000), 0)), "cls": cls}, "rejected", "--max-pixels")
    add("nolabel", {"png": _encode(_pattern("L", (28, 28)))}, "rejected", "label")
    add("textlabel", {"png": _encode(_pattern("L", (28, 28))), "cls": b"seven"}, "rejected", "not an integer")
    # Too large for any model (a label >= --num-classes but below that is refused at plan time instead).
    add("bigl", {"png": _encode(_pattern("L", (28, 28))), "cls": b"1000000"}, "rejected", "out of range")
    add("noimage", {"cls": cls, "txt": b"caption only"}, "rejected", "no image member")
    add("gray", {"png": _encode(_pattern("L", (28, 28))), "cls": b"4"}, "rejected", "repeated")  # the repeat
    return s, want


def _hostile_shard() -> tuple[bytes, dict[str, str]]:
    """Names that escape the folder of whoever unpacks the release, a name that is not UTF-8, and images with an
    unprotected copy beside them: (tar bytes, expected error text per manifest key). One good sample."""
    img = _encode(_pattern("RGB", (28, 28)))
    members = [
        ("../../evil.png", img),
        ("../../evil.cls", b"3"),
        ("/abs/evil2.png", img),
        ("/abs/evil2.cls", b"3"),
        (b"bad\xff.png".decode("utf-8", "surrogateescape"), img),
        (b"bad\xff.cls".decode("utf-8", "surrogateescape"), b"3"),
    ]
    for fmt, ext in (("TIFF", "tif"), ("BMP", "bmp"), ("GIF", "gif")):
        members += [
            (f"copy{ext}.png", img),
            (f"copy{ext}.{ext}", _encode(_pattern("RGB", (28, 28)), fmt)),
            (f"copy{ext}.cls", b"3"),
        ]
    members += [("fine.png", img), ("fine.cls", b"3")]
    want = {
        "../../evil": "absolute or holds '..'",
        "/abs/evil2": "absolute or holds '..'",
        "bad\\xff": "not valid UTF-8",
        "copytif": "'.tif' decodes as an image",
        "copybmp": "'.bmp' decodes as an image",
        "copygif": "'.gif' decodes as an image",
    }
    return raw_tar(members), want


def _truncated_shard(good: list[RawSample]) -> tuple[bytes, list[str], str]:
    """Five good samples, cut off inside the fourth one's image: (bytes, keys before the cut, the cut key)."""
    data = write_tar(good[:5])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(good[3].key) and m.name.endswith(".png"))
    return data[: member.offset_data + 40], [g.key for g in good[:3]], good[3].key


@pytest.fixture(scope="module")
def wild_run(mnist_small, tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("wild")
    corpus = root / "corpus"
    corpus.mkdir()
    good_tar = os.path.join(mnist_small["root"], "train", "train-000000.tar")
    shutil.copy(good_tar, corpus / "good-000000.tar")
    with tarfile.open(good_tar) as tar:
        names = tar.getnames()
        keys = sorted({n.split(".", 1)[0] for n in names})[:5]
        good = [
            RawSample("t" + k, {"png": tar.extractfile(f"{k}.png").read(), "cls": tar.extractfile(f"{k}.cls").read()})
            for k in keys
        ]
    odd, want = _odd_samples()
    (corpus / "odd-000000.tar").write_bytes(write_tar(odd))
    truncated, before, cut = _truncated_shard(good)
    (corpus / "cut-000000.tar").write_bytes(truncated)
    hostile, hostile_want = _hostile_shard()
    (corpus / "hostile-000000.tar").write_bytes(hostile)
    (corpus / "zero-000000.tar").write_bytes(b"")
    (corpus / "empty-000000.tar").write_bytes(write_tar([]))
    out = str(root / "release")
    proc = run_cli("protect", "--input", str(corpus), "--output", out, *ARGS, ray_address=ray_cluster)
    rows = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist() if proc.returncode in (0, 4) else []
    return {
        "proc": proc,
        "out": out,
        "want": want,
        "before": before,
        "cut": cut,
        "odd": odd,
        "rows": rows,
        "hostile": hostile_want,
    }


def test_the_run_completes_and_verify_passes(wild_run):
    proc = wild_run["proc"]
    assert proc.returncode in (0, 4), proc.stderr[-4000:]
    ver = run_cli("verify", wild_run["out"])
    assert ver.returncode == 0, ver.stdout + ver.stderr


def test_every_input_sample_has_exactly_one_row_with_the_expected_outcome(wild_run):
    rows = wild_run["rows"]
    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    # the zero-byte and empty shards hold none
    assert sorted(by_shard) == ["cut-000000", "good-000000", "hostile-000000", "odd-000000"]
    assert len(by_shard["good-000000"]) == 100 and {r["status"] for r in by_shard["good-000000"]} == {"protected"}
    odd = by_shard["odd-000000"]
    assert [r["key"] for r in odd] == [s.key for s in wild_run["odd"]]  # one row per input sample, in order
    seen = set()
    for r in odd:
        status, detail = wild_run["want"][r["key"]] if r["key"] not in seen else ("rejected", "repeated")
        seen.add(r["key"])
        assert r["status"] == status, r
        if status == "rejected":
            assert detail in r["error"], r
            assert r["output_member"] is None and r["output_sha256"] is None
        else:
            assert r["error"] is None and 0 <= r["linf"] <= 8
    cut = {r["key"]: r for r in by_shard["cut-000000"]}
    assert set(cut) == set(wild_run["before"]) | {wild_run["cut"]}
    assert all(cut[k]["status"] == "protected" for k in wild_run["before"])
    assert cut[wild_run["cut"]]["status"] == "rejected" and "truncated" in cut[wild_run["cut"]]["error"]


def test_counts_add_up_and_shard_faults_are_recorded(wild_run):
    out, rows = wild_run["out"], wild_run["rows"]
    success = _load_json(os.path.join(out, "_SUCCESS.json"))
    protected = sum(r["status"] == "protected" for r in rows)
    assert success["counts"] == {"input": len(rows), "protected": protected, "rejected": len(rows) - protected}
    assert success["counts"]["rejected"] == 8 + 6
    for shard in ("zero-000000", "cut-000000"):
        marker = _load_json(os.path.join(out, f"{shard}_stats.json"))
        assert marker["read_error"], shard
    assert _load_json(os.path.join(out, "empty-000000_stats.json"))["read_error"] is None
    # Every shard, even one with no samples, has its (possibly empty) tar, manifest and marker.
    with tarfile.open(os.path.join(out, "zero-000000.tar")) as tar:
        assert tar.getnames() == []


def test_odd_formats_are_converted_and_protected_and_rejects_are_not_released(wild_run):
    out = wild_run["out"]
    with tarfile.open(os.path.join(out, "odd-000000.tar")) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    released_keys = {n.split(".", 1)[0] for n in members}
    want = wild_run["want"]
    assert released_keys == {k for k, (status, _) in want.items() if status == "protected"}
    expected_other = [
        "gray.cls",
        "gray.txt",
        "rgba.cls",
        "palette.cls",
        "png16.cls",
        "cmyk.cls",
        "exif.cls",
        "wrongext.cls",
        "onepixel.cls",
    ]
    assert sorted(n for n in members if not n.endswith(".png")) == sorted(expected_other)
    assert members["gray.txt"] == b"kept as it was" and members["gray.cls"] == b"3"  # the first "gray" is kept
    originals = {s.key: s for s in wild_run["odd"][:8]}
    for key in originals:
        img = Image.open(io.BytesIO(members[f"{key}.png"]))
        assert img.mode == want[key][1], (key, img.mode)
    exif = Image.open(io.BytesIO(members["exif.png"]))
    assert exif.size == (20, 40)  # EXIF orientation applied before protection
    upright = np.asarray(Image.open(io.BytesIO(originals["exif"].members["jpg"])).transpose(Image.Transpose.ROTATE_270))
    assert np.abs(np.asarray(exif).astype(int) - upright.astype(int)).max() <= 8  # the photo's pixels, upright
    # Where it was taken, the camera and the XMP are gone; the colour profile is kept (default: no --keep-metadata).
    assert exif.info.get("icc_profile") == SRGB and len(exif.getexif()) == 0
    assert not any(word in members["exif.png"] for word in (b"eXIf", b"GPS", b"CameraMaker", b"xmpmeta"))
    assert Image.open(io.BytesIO(members["onepixel.png"])).size == (1, 1)
    rgba = np.array(Image.open(io.BytesIO(members["rgba.png"])))
    assert (rgba[:, :10, 3] == 90).all() and (rgba[:, 10:, 3] == 255).all()  # alpha untouched
    source = np.array(Image.open(io.BytesIO(originals["rgba"].members["png"])))
    assert np.abs(rgba[..., :3].astype(int) - source[..., :3].astype(int)).max() <= 8


def test_hostile_names_and_unprotected_copies_are_rejected_and_never_released(wild_run):
    rows = {r["key"]: r for r in wild_run["rows"] if r["shard"] == "hostile-000000"}
    assert set(rows) == set(wild_run["hostile"]) | {"fine"}
    assert rows["fine"]["status"] == "protected"
    for key, error in wild_run["hostile"].items():
        assert rows[key]["status"] == "rejected" and error in rows[key]["error"], rows[key]
    with tarfile.open(os.path.join(wild_run["out"], "hostile-000000.tar")) as tar:
        assert sorted(tar.getnames()) == ["fine.cls", "fine.png"]
    for name in os.listdir(wild_run["out"]):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(wild_run["out"], name)) as tar:
                for member in tar.getnames():
                    assert not member.startswith("/") and ".." not in member, member
                    assert member.rsplit(".", 1)[-1] not in ("tif", "bmp", "gif", "jpg"), member
