"""The learning thresholds, on the full bundled data: ``unlearnable demo`` as a user runs it.

4,000 real MNIST digits protected with the demo's (sample-wise) settings on a real local Ray; victims trained from
scratch on clean and on protected shards and scored on the 1,000 clean test digits. This is the test that checks
learning: the protected victim at most 40%, the clean victim at least 95%, and the probe agreeing with the victims.
"""

from __future__ import annotations

import json
import os
import re

from conftest import run_cli


def test_demo_protects_mnist_and_the_probe_agrees_with_the_victims(tmp_path):
    out = str(tmp_path / "demo")
    # The plain probe only: the battery's adversarial-training probe and victims would add minutes on 2 CPU cores
    # (the battery's mechanics and verdicts are checked in test_protect_mnist.py).
    proc = run_cli("demo", "--output", out, "--probe-countermeasures", "none", timeout=1100)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert summary["victim_clean"] >= 0.95, summary
    assert summary["victim_protected"] <= 0.40, summary
    assert summary["protection_holds"] is True and summary["stop_reason"] == "stop_rule", summary
    # The probe agrees with the victims: low when they are low.
    assert summary["probe_accuracy"] <= 0.40 and abs(summary["probe_accuracy"] - summary["victim_protected"]) <= 0.2
    with open(os.path.join(out, "release", "_SUCCESS.json")) as f:
        success = json.load(f)
    assert success["protection"]["probe_accuracy"] == summary["probe_accuracy"]
    assert success["counts"] == {"input": 4000, "protected": 4000, "rejected": 0}
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    assert "probe" in report and f"{100 * summary['victim_protected']:.1f}%" in report and "**holds**" in report
    assert os.path.getsize(os.path.join(out, "report.png")) > 10_000
    # The run's report.html, beside the release (as `unlearnable report` writes it), with originals and noise.
    folder = os.path.join(out, "release.report")
    assert os.path.realpath(summary["report_html"]) == os.path.realpath(os.path.join(folder, "report.html"))
    with open(summary["report_html"], encoding="utf-8") as f:
        page = f.read()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert "sample-00-original.png" in sources and "sample-00-noise.png" in sources and "battery.png" not in sources
    assert all(os.path.isfile(os.path.join(folder, s)) for s in sources) and "protection holds" in page
    assert not os.path.exists(os.path.join(out, "release.work"))  # noise state never left behind
