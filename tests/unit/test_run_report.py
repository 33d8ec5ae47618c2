"""``unlearnable report`` on releases built by hand: what the page says, where it goes, and what it refuses.

The end-to-end check on a real run is tests/e2e/test_report.py; these build a ``_SUCCESS.json``, a manifest and a
shard directly, so that hostile keys, grayscale and colour, JPEG members and every refusal are checked in seconds.
"""

from __future__ import annotations

import html
import io
import json
import os
import re

import numpy as np
import pytest
from conftest import raw_tar
from PIL import Image

from pipeline.cli import EXIT_BAD_ARGS, main
from pipeline.storage import manifest
from tools.run_report import report_dir, write_run_report

HOSTILE_KEY = "x<script>alert(1)</script>"
HOSTILE_REASON = 'undecodable image: <img src=x onerror="alert(2)">'


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _success(holds: bool, battery: bool = True) -> dict:
    protection = {
        "holds": holds,
        "probe_holds": True,
        "probe_accuracy": 0.21,
        "probe_clean_accuracy": 0.95,
        "chance": 0.5,
        "threshold": 0.6,
        "arch": "resnet-mini",
        "steps": 30,
    }
    if battery:
        protection["countermeasures"] = {
            "none": {"accuracy": 0.21, "early_stopped_accuracy": 0.3, "best_epoch": 2, "worst": 0.3, "holds": True},
            "at:4/255": {
                "accuracy": 0.9 if not holds else 0.4,
                "early_stopped_accuracy": 0.55,
                "best_epoch": 3,
                "worst": 0.9 if not holds else 0.55,
                "holds": holds,
            },
        }
        protection["worst_case"] = {"countermeasure": "at:4/255", "accuracy": 0.9 if not holds else 0.55}
    return {
        "config": {
            "mode": "samplewise",
            "eps": 8 / 255,
            "stop_error": 0.01,
            "max_pixels": 50_000_000,
            "image_key": None,
            "label_key": "cls",
            "note": "<b>not bold</b>",
        },
        "config_hash": "abc",
        "rounds": 2,
        "stop_reason": "stop_rule",
        "surrogate_error": 0.004,
        "protection": protection,
        "counts": {"input": 5, "protected": 4, "rejected": 1},
        "shards": 1,
        "history": [
            {"round": 0, "error": 0.7, "image_steps": 12, "probe_accuracy": None},
            {"round": 1, "error": 0.004, "image_steps": 12, "probe_accuracy": 0.21},
        ],
        "timings": {"load": 1.0, "noise": 3.0, "total": 5.0},
    }


@pytest.fixture()
def release(tmp_path):
    """A one-shard release of a grayscale PNG, a colour JPEG, a hostile key and a second label-0 sample (labels 0,
    1, 2, 0), one rejection, and its input shard."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    colour = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    noise_g = rng.integers(-8, 9, gray.shape)
    released_gray = np.clip(gray + noise_g, 0, 255).astype(np.uint8)
    # JPEG is lossy: the original is made from the decoded release, so that released - original is the noise exactly.
    released_colour = _jpeg(colour)
    decoded = np.array(Image.open(io.BytesIO(released_colour)))
    original_colour = np.clip(decoded.astype(int) - rng.integers(-4, 5, decoded.shape), 0, 255).astype(np.uint8)
    out = tmp_path / "release"
    inputs = tmp_path / "inputs"
    out.mkdir()
    inputs.mkdir()
    (inputs / "s-000.tar").write_bytes(
        raw_tar(
            [
                ("g0.png", _png(gray)),
                ("g0.cls", b"0"),
                ("c1.png", _png(original_colour)),
                ("c1.cls", b"1"),
                (f"{HOSTILE_KEY}.png", _png(gray)),
                (f"{HOSTILE_KEY}.cls", b"2"),
                ("dup.png", _png(gray)),
                ("dup.cls", b"0"),
                ("bad.png", b"nope"),
                ("bad.cls", b"1"),
            ]
        )
    )
    (out / "s-000.tar").write_bytes(
        raw_tar(
            [
                ("g0.png", _png(released_gray)),
                ("g0.cls", b"0"),
                ("c1.jpg", released_colour),
                ("c1.cls", b"1"),
                (f"{HOSTILE_KEY}.png", _png(released_gray)),
                (f"{HOSTILE_KEY}.cls", b"2"),
                ("dup.png", _png(released_gray)),
                ("dup.cls", b"0"),
            ]
        )
    )
    rows = [
        manifest.row("g0", "s-000", "protected", label=0, output_member="g0.png"),
        manifest.row("c1", "s-000", "protected", label=1, output_member="c1.jpg"),
        manifest.row(HOSTILE_KEY, "s-000", "protected", label=2, output_member=f"{HOSTILE_KEY}.png"),
        manifest.row("dup", "s-000", "protected", label=0, output_member="dup.png"),
        manifest.row("bad", "s-000", "rejected", error=HOSTILE_REASON, label=1),
    ]
    (out / "manifest.parquet").write_bytes(manifest.to_parquet(rows))
    (out / "_SUCCESS.json").write_text(json.dumps(_success(holds=False)))
    return {"out": str(out), "inputs": str(inputs), "gray": gray, "original_colour": original_colour}


def html_escaped(text: str) -> str:
    return html.escape(text, quote=True)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def test_report_goes_beside_the_release_and_links_only_its_own_pngs(release):
    before = sorted(os.listdir(release["out"]))
    path = write_run_report(release["out"], [release["inputs"]])
    assert path == release["out"] + ".report/report.html"
    assert sorted(os.listdir(release["out"])) == before  # nothing written into the release
    page = _read(path)
    sources = _img_sources(page)
    assert sources and all(re.fullmatch(r"[a-z0-9-]+\.png", s) for s in sources)
    for src in sources:
        assert os.path.isfile(os.path.join(release["out"] + ".report", src))
    # Self-contained: no script, no external style sheet, nothing fetched.
    assert "<script" not in page.lower() and "<link" not in page.lower() and "http" not in page


def test_keys_reasons_and_config_values_are_escaped(release):
    page = _read(write_run_report(release["out"], [release["inputs"]]))
    assert "<script>" not in page and html_escaped(HOSTILE_KEY) in page
    assert 'onerror="alert(2)"' not in page and html_escaped(HOSTILE_REASON) in page
    assert "<b>not bold</b>" not in page


def test_grayscale_and_colour_jpeg_originals_noise_and_released_one_per_label(release):
    folder = release["out"] + ".report"
    page = _read(write_run_report(release["out"], [release["inputs"]], samples=8))
    # One sample per label (0, 1, 2): g0, c1 and the hostile key, not the second label-0 sample.
    assert "s-000 / g0" in page and "s-000 / c1" in page and "s-000 / dup" not in page
    names = sorted(n for n in os.listdir(folder) if n.startswith("sample-"))
    assert names == [f"sample-{i:02d}-{kind}.png" for i in range(3) for kind in ("noise", "original", "released")]
    assert Image.open(os.path.join(folder, "sample-00-original.png")).mode == "L"
    assert Image.open(os.path.join(folder, "sample-01-original.png")).mode == "RGB"
    original = np.array(Image.open(os.path.join(folder, "sample-00-original.png")))
    assert original.shape[1] == 144 and (original[::6, ::6] == release["gray"]).all()  # enlarged pixel for pixel
    assert "not this run" not in page  # the noise of both is within the budget


def test_a_lossy_release_of_a_gray_image_shows_its_noise_within_what_the_manifest_records(tmp_path):
    """A WebP release of a gray image comes back as RGB channels a level apart, and its codec error is over eps:
    compared as gray and against the manifest's linf, its noise is shown, and --input is not doubted."""
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).convert("RGB").save(buf, format="WEBP", quality=60)
    decoded = np.array(Image.open(io.BytesIO(buf.getvalue())))
    linf = int(np.abs(decoded.astype(int) @ np.array([299, 587, 114]) // 1000 - gray.astype(int)).max()) + 1
    assert linf > 8
    out, inputs = tmp_path / "release", tmp_path / "inputs"
    out.mkdir()
    inputs.mkdir()
    (inputs / "s-000.tar").write_bytes(raw_tar([("w0.png", _png(gray)), ("w0.cls", b"0")]))
    (out / "s-000.tar").write_bytes(raw_tar([("w0.webp", buf.getvalue()), ("w0.cls", b"0")]))
    rows = [manifest.row("w0", "s-000", "protected", label=0, output_member="w0.webp", linf=linf)]
    (out / "manifest.parquet").write_bytes(manifest.to_parquet(rows))
    (out / "_SUCCESS.json").write_text(json.dumps(_success(holds=True, battery=False)))
    page = _read(write_run_report(str(out), [str(inputs)]))
    assert "sample-00-noise.png" in _img_sources(page) and "not this run" not in page


def test_without_input_only_released_images_and_the_reason(release):
    folder = release["out"] + ".report"
    page = _read(write_run_report(release["out"]))
    assert "does not name the inputs" in page
    assert sorted(n for n in os.listdir(folder) if n.startswith("sample-")) == [
        f"sample-{i:02d}-released.png" for i in range(3)
    ]


def test_a_rerun_with_fewer_samples_leaves_no_stale_pictures(release):
    folder = release["out"] + ".report"
    os.makedirs(folder)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("mine")
    write_run_report(release["out"], [release["inputs"]])
    write_run_report(release["out"], [release["inputs"]], samples=1)
    assert sorted(n for n in os.listdir(folder) if n.startswith("sample-")) == [
        "sample-00-noise.png",
        "sample-00-original.png",
        "sample-00-released.png",
    ]
    assert os.path.exists(os.path.join(folder, "notes.txt"))  # what the report did not write stays


def test_not_protected_is_loud_and_never_says_holds(release):
    page = _read(write_run_report(release["out"]))
    summary = re.search(r'id="summary">([^<]*)<', page).group(1)
    assert "NOT PROTECTED" in page.split('id="summary"')[0]  # the warning comes before everything else
    assert "does NOT hold" in summary and "protection holds" not in page
    assert "worst case of the battery 90.0% under at:4/255" in summary
    assert "4 protected and 1 rejected of 5" in summary and "2 round(s)" in summary and "stop_rule" in summary


def test_a_run_whose_probe_cannot_certify_it_says_why(release):
    with open(os.path.join(release["out"], "_SUCCESS.json")) as f:
        success = json.load(f)
    success["protection"].update(holds=False, certified=False, why="the probe learns the clusters <not classes>")
    with open(os.path.join(release["out"], "_SUCCESS.json"), "w") as f:
        json.dump(success, f)
    page = _read(write_run_report(release["out"], [release["inputs"]]))
    assert "NOT PROTECTED: the probe learns the clusters &lt;not classes&gt;" in page
    assert "protection holds" not in page


def test_protected_run_says_holds_without_a_warning(release):
    with open(os.path.join(release["out"], "_SUCCESS.json"), "w") as f:
        json.dump(_success(holds=True, battery=False), f)
    page = _read(write_run_report(release["out"]))
    assert "NOT PROTECTED" not in page and "protection holds" in page and "No countermeasure battery" in page
    assert not os.path.exists(release["out"] + ".report/battery.png")


def test_rejections_by_reason_and_rounds_table(release):
    page = _read(write_run_report(release["out"]))
    assert re.search(re.escape(html_escaped(HOSTILE_REASON)) + r'</td><td class="n">1</td>', page)
    assert '<td class="n">1</td><td class="n">0.0040</td><td class="n">21.0%</td>' in page


def test_report_dir_defaults_and_refusals(tmp_path, monkeypatch):
    out = str(tmp_path / "rel")
    assert report_dir(out) == out + ".report"
    assert report_dir(out, str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    assert report_dir("s3://bucket/some/rel/") == str(tmp_path / "rel.report")
    for inside in (out, os.path.join(out, "r"), out + ".work", os.path.join(out + ".work", "r")):
        with pytest.raises(ValueError, match="inside"):
            report_dir(out, inside)
    with pytest.raises(ValueError, match="not a local folder"):
        report_dir(out, "s3://bucket/reports")


def test_cli_refuses_an_unfinished_run_and_an_out_inside_the_release(release, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert main(["report", str(unfinished)]) == EXIT_BAD_ARGS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finished" in err[0] and "unlearnable status" in err[0]
    assert main(["report", release["out"], "--out", os.path.join(release["out"], "r")]) == EXIT_BAD_ARGS
    assert "inside the release" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(release["out"], "r"))
    assert main(["report", release["out"], "--input", release["inputs"]]) == 0
    assert capsys.readouterr().out.strip() == release["out"] + ".report/report.html"
