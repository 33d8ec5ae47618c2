"""End to end: ``unlearnable report`` on a real finished run (real MNIST shards, a real local Ray), as a user runs it.

The run is small and short (two rounds, the plain probe only): the report's content is checked against the run's
own ``_SUCCESS.json`` and manifest, whatever the protection's verdict.
"""

from __future__ import annotations

import html
import json
import os
import re

import pytest
from conftest import run_cli

from pipeline.cli import main

SHORT = [
    "--resolution",
    "28",
    "--pgd-steps",
    "2",
    "--step-size",
    "2/255",
    "--train-steps",
    "3",
    "--batch-size",
    "128",
    "--max-rounds",
    "2",
    "--probe-countermeasures",
    "none",
    "--probe-steps",
    "4",
]


@pytest.fixture(scope="module")
def finished_run(mnist_small, tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("report")
    out = str(root / "release")
    train = os.path.join(mnist_small["root"], "train")
    proc = run_cli("protect", "--input", train, "--output", out, *SHORT, ray_address=ray_cluster)
    assert proc.returncode in (0, 4), proc.stderr[-3000:]
    with open(os.path.join(out, "_SUCCESS.json")) as f:
        success = json.load(f)
    return {"out": out, "train": train, "root": str(root), "success": success}


def test_report_of_a_real_run_beside_the_release_matches_its_record(finished_run):
    out, success = finished_run["out"], finished_run["success"]
    before = sorted(os.listdir(out))
    proc = run_cli("report", out, "--input", finished_run["train"], "--samples", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out + ".report"
    assert proc.stdout.strip() == os.path.join(folder, "report.html")
    assert sorted(os.listdir(out)) == before  # the release is untouched: nothing inside it
    with open(os.path.join(folder, "report.html"), encoding="utf-8") as f:
        page = f.read()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert (
        "rounds.png" in sources and sum(s.startswith("sample-") for s in sources) == 15
    )  # 5 x original/noise/released
    for src in sources:
        assert src.endswith(".png") and "/" not in src and os.path.getsize(os.path.join(folder, src)) > 0
    counts = success["counts"]
    summary = html.unescape(re.search(r'id="summary">([^<]*)<', page).group(1))
    assert (
        f"{counts['protected']} protected and {counts['rejected']} rejected of {counts['input']} input samples; "
        f"{success['rounds']} round(s), stop reason {success['stop_reason']}"
    ) in summary
    assert ("protection holds" in summary) == success["protection"]["holds"]
    assert ("NOT PROTECTED" in page) == (not success["protection"]["holds"])
    # The round table, row for row as _SUCCESS.json's history.
    for h in success["history"]:
        probe = "" if h["probe_accuracy"] is None else f"{100 * h['probe_accuracy']:.1f}%"
        assert (
            f'<tr><td class="n">{h["round"]}</td><td class="n">{h["error"]:.4f}</td><td class="n">{probe}</td>' in page
        )
    assert (
        f'<td class="n">{counts["input"]}</td><td class="n">{counts["protected"]}</td>'
        f'<td class="n">{counts["rejected"]}</td>'
    ) in page
    assert "No countermeasure battery" in page  # --probe-countermeasures none


def test_report_refuses_an_unfinished_run_and_an_out_inside_the_release_or_work_dir(finished_run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    proc = run_cli("report", str(unfinished))
    assert proc.returncode == 2 and "not finished" in proc.stderr and "unlearnable status" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    out = finished_run["out"]
    before = sorted(os.listdir(out))
    for inside in (os.path.join(out, "report"), os.path.join(out + ".work", "report")):
        assert main(["report", out, "--out", inside]) == 2  # in-process: the same CLI, without a second start
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "inside" in err[0] and not os.path.exists(inside)
    assert sorted(os.listdir(out)) == before
