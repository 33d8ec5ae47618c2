"""``unlearnable demo`` as a user runs it, on the full bundled data (4,000 real MNIST digits, 1,000 test digits).

The demo protects the train shards on a real local Ray, trains victims from scratch on clean and on protected shards,
and scores them on the clean test digits. What this test holds the demo to is honesty: the clean victim learns, the
probe's verdict matches the victims (it never reports protection that the victims do not confirm), the exit status
matches the verdict, and the report carries the figures.

The issue's learning target (protected victim at most 40%) is NOT met yet at eps 8/255 on MNIST (README,
"Measurements"); when it is, tighten ``victim_protected`` here.
"""

from __future__ import annotations

import json
import os

from conftest import run_cli


def test_demo_reports_victims_and_a_probe_that_agrees_with_them(tmp_path):
    out = str(tmp_path / "demo")
    proc = run_cli("demo", "--output", out, timeout=900)
    assert proc.returncode in (0, 4), proc.stderr[-4000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert summary["victim_clean"] >= 0.95, summary
    # The exit status is the probe's verdict, and the verdict agrees with the victims trained from scratch.
    assert (proc.returncode == 0) == summary["protection_holds"]
    if summary["protection_holds"]:
        assert summary["victim_protected"] <= 0.40 and summary["stop_reason"] == "stop_rule", summary
    if summary["victim_protected"] > 0.5:
        assert summary["protection_holds"] is False, summary
        assert "PROTECTION DOES NOT HOLD" in proc.stderr
    assert abs(summary["probe_accuracy"] - summary["victim_protected"]) <= 0.25, summary
    success = json.load(open(os.path.join(out, "release", "_SUCCESS.json")))
    assert success["protection"]["probe_accuracy"] == summary["probe_accuracy"]
    assert success["counts"] == {"input": 4000, "protected": 4000, "rejected": 0}
    report = open(os.path.join(out, "report.md")).read()
    assert "probe" in report and f"{100 * summary['victim_protected']:.1f}%" in report
    assert ("does NOT hold" in report) == (not summary["protection_holds"])
    assert os.path.getsize(os.path.join(out, "report.png")) > 10_000
    assert not os.path.exists(os.path.join(out, "release.work"))  # noise state never left behind
