"""``unlearnable bench`` as a user runs it, tiny: it times both variants and a whole round, and says so.

No timing is asserted (the figures depend on the machine and its load); the test checks the bench runs, prints its
table, and that ``--json`` carries every figure as a positive number.
"""

from __future__ import annotations

import json

from conftest import run_cli

TINY = (
    "bench",
    "--surrogate",
    "small-cnn",
    "--resolution",
    "16",
    "--batch-size",
    "8",
    "--steps",
    "2",
    "--iters",
    "1",
    "--round-shards",
    "2",
    "--round-samples",
    "12",
    "--train-steps",
    "2",
    "--threads",
    "1",
)


def test_bench_prints_the_table_with_baseline_engine_ratio_and_round():
    proc = run_cli(*TINY, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for text in (
        "baseline (paper-style fp32 eager)",
        "engine",
        "ratio engine / baseline:",
        "FLOPs per image-step",
        "MFU: GPU only",
        "whole round in-process",
        "of the engine's step rate",
        "train",
        "noise",
        "check",
    ):
        assert text in out, out


def test_bench_json_has_the_figures_as_positive_numbers():
    # --check on photos of another size than the working one: the round's stop check resizes every image.
    proc = run_cli(*TINY, "--json", "--check", "--native-size", "23", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    for key in ("baseline_img_steps_per_s", "engine_img_steps_per_s", "ratio", "gflop_per_img_step"):
        assert isinstance(res[key], float) and res[key] > 0, (key, res)
    assert "mfu" in res and res["mfu"] is None  # no GPU here: no MFU claimed
    # The engine's noise is as strong as the baseline's and within the budget.
    assert res["engine_loss_after"] <= res["baseline_loss_after"] + 0.05 * res["loss_before"]
    assert res["engine_linf"] <= 8 / 255 + 1e-6
    rd = res["round"]
    assert rd["image_steps"] == 24 * 2  # 2 shards x 12 samples x 2 steps, no sample skipped by default
    for key in ("decode_s", "train_s", "noise_s", "check_s", "round_img_steps_per_s", "fraction_of_step_rate"):
        assert rd[key] > 0, (key, rd)
    assert rd["native_size"] == 23
    assert len(res["checks"]) == 3 and len(rd["checks"]) == 2 and "checks: all passed" in proc.stderr


def test_bench_check_fails_loudly_when_the_noise_breaks_its_budget(monkeypatch, capsys):
    import argparse

    import ops.engine
    from tools import bench

    parser = argparse.ArgumentParser()
    bench.add_bench_args(parser)
    args = parser.parse_args([*TINY[1:], "--check", "--no-round"])
    # An engine whose projection blows the noise up instead of keeping it in the eps-ball (the baseline keeps its
    # own clamp).
    monkeypatch.setattr(ops.engine, "project", lambda delta, x, eps: 10 * delta)
    assert bench.bench_cli(args) == 1
    assert "checks: FAILED: engine |delta| <= eps" in capsys.readouterr().err
