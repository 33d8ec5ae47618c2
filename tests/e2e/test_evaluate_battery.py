"""``unlearnable evaluate`` with a countermeasure battery, as a user runs it: real MNIST digits, real training.

Every countermeasure asked for is reported with a final and an early-stopped accuracy per seed, the worst case is
the largest of them, and a bad countermeasure is refused with exit 2 and one line on stderr.
"""

from __future__ import annotations

import json

from conftest import run_cli

BATTERY = ["none", "mixup", "at:4/255"]


def test_evaluate_reports_every_countermeasure_and_the_worst_case(mnist_small):
    args = [
        "evaluate",
        "--train",
        mnist_small["train"][0],
        "--train",
        mnist_small["train"][1],
        "--train",
        mnist_small["train"][2],
        "--test",
        mnist_small["test"][0],
        "--arch",
        "small-cnn",
        "--epochs",
        "2",
        "--resolution",
        "28",
        "--pad",
        "2",
        "--batch-size",
        "8",
        "--json",
    ]
    for cm in BATTERY:
        args += ["--countermeasure", cm]
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    cms = result["countermeasures"]
    assert list(cms) == ["none", "mixup:1.0", "at:4/255"]
    assert [cms[k]["kind"] for k in cms] == ["none", "train", "train"]
    for name, r in cms.items():
        assert len(r["final_accuracy"]) == len(r["early_stopped_accuracy"]) == 1, name
        for acc in r["final_accuracy"] + r["early_stopped_accuracy"]:
            assert 0.0 <= acc <= 1.0, name
        assert len(r["validation_curve"][0]) == len(r["holdout_curve"][0]) == 2
        best = r["best_epoch"][0]
        assert r["validation_curve"][0][best - 1] == max(r["validation_curve"][0])
        assert r["early_stopped_accuracy"][0] == r["holdout_curve"][0][best - 1]
        assert r["worst"] == max(r["mean_final_accuracy"], r["mean_early_stopped_accuracy"])
        # Each class's accuracy: the final accuracy is their mean weighted by the classes' test images.
        per_class = [a for a in r["class_accuracy"][0] if a is not None]
        assert len(r["class_accuracy"][0]) == 10 and len(per_class) >= 2, name
        assert min(per_class) <= r["final_accuracy"][0] <= max(per_class), name
        f1 = r["mean_class_f1"]
        assert r["best_class"]["f1"] == max(f for f in f1 if f is not None) == f1[r["best_class"]["class"]]
        assert r["best_class"]["accuracy"] == r["mean_class_accuracy"][r["best_class"]["class"]]
    worst = result["worst_case"]
    assert worst["accuracy"] == max(r["worst"] for r in cms.values())
    assert cms[worst["countermeasure"]]["worst"] == worst["accuracy"]
    # The old fields, which the demo reads, are the plain victim's; 300 real digits teach it well above chance.
    assert result["test_accuracy"] == cms["none"]["final_accuracy"]
    assert result["mean_accuracy"] == cms["none"]["mean_final_accuracy"] > 0.25
    assert result["validation_samples"] + result["holdout_samples"] == result["test_samples"] == 100


def test_unknown_countermeasure_exits_2_with_one_line(mnist_small):
    proc = run_cli(
        "evaluate",
        "--train",
        mnist_small["train"][0],
        "--test",
        mnist_small["test"][0],
        "--arch",
        "small-cnn",
        "--epochs",
        "1",
        "--countermeasure",
        "none",
        "--countermeasure",
        "jpeg2000:5",
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "jpeg2000" in lines[0] and "unknown countermeasure" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = run_cli(
        "evaluate",
        "--train",
        mnist_small["train"][0],
        "--test",
        mnist_small["test"][0],
        "--countermeasures",
        "none,bdr:12",
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "bdr" in proc.stderr
