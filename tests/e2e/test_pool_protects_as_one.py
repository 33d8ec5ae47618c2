"""A pool of two workers protects as well as one worker: ``protect`` on 1,000 real MNIST digits in 4 shards, once
with ``--workers 1`` and once with ``--workers 2`` (two CPU actors on a real local Ray, gloo), then victims trained
from scratch on each release.

The shards are the digits in index order, so sorted by class: worker 0 of the pool holds digits 0-2 and 5-7,
worker 1 holds 2-4 and 7-9. This is the kind of corpus on which a pool used to stall (per-worker batch-norm
statistics: on 1,500 such digits the run went all 30 rounds and did not protect, where one worker stopped in 7). The
pool now draws one worker's batches and normalises over the whole batch, so the two runs follow the same trajectory
up to float32 summation order.

The noise and the surrogate are at the demo's settings (small-cnn, 10 PGD steps of eps/5, 20 train steps of 512 a
round, stop at 1% error): this test took 348 s with them and 567 s at protect's defaults (20 PGD steps of eps/10,
10 train steps), both with other runs sharing the cores; at ``--resolution 28``
(the digits' own size: the default 32 would resample the noise twice); the probe is small-cnn (the default
resnet-mini probe costs 75 s a run on these cores), 100 steps (the default 200 took 50-64 s a run here, released and
clean) and plain (the battery is the adversary's business, not the pool's); the victims below measure the
protection. (Batch 256 for the train stage was tried to save time: the two runs' errors drifted 0.088 apart in round
2, too near the 0.1 margin, where batch 512 keeps them within 0.03.) The two runs go at the same time, each worker on one CPU thread
(``--cpus-per-worker 1``, not part of the result): three threads on two cores. The pool finishes first, and its
victims train while the single worker is still at work.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
from conftest import REPO

from pipeline.evaluate import evaluate

ARGS = [
    "--resolution",
    "28",
    "--pgd-steps",
    "10",
    "--step-size",
    "8/1275",
    "--train-steps",
    "20",
    "--probe-steps",
    "100",
    "--probe-arch",
    "small-cnn",
    "--probe-countermeasures",
    "none",
    "--keep-work",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    from tools.mnist import make_mnist_corpus

    root = tmp_path_factory.mktemp("mnist-1000")
    made = make_mnist_corpus(str(root), per_class_train=100, per_class_test=50, per_shard=250)
    assert len(made["train"]) == 4
    return {"root": str(root), **made}


def _start(corpus: dict, tmp, workers: int) -> dict:
    out, work = str(tmp / f"out-{workers}"), str(tmp / f"work-{workers}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(str(tmp / f"protect-{workers}.log"), "w+")  # noqa: SIM115 - read back and closed in _finish
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "protect",
            "--input",
            os.path.join(corpus["root"], "train"),
            "--output",
            out,
            "--work-dir",
            work,
            "--workers",
            str(workers),
            "--cpus-per-worker",
            "1",
            *ARGS,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    return {"proc": proc, "log": log, "out": out, "work": work}


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _finish(run: dict, corpus: dict) -> dict:
    try:
        code = run["proc"].wait(timeout=900)
    finally:
        run["proc"].kill()
    run["log"].seek(0)
    text = run["log"].read()
    run["log"].close()
    assert code == 0, text[-4000:]
    out, work = run["out"], run["work"]
    success = _json(os.path.join(out, "_SUCCESS.json"))
    rounds = [
        _json(os.path.join(work, name, "round.json")) for name in sorted(os.listdir(work)) if name.startswith("round-")
    ]
    victims = evaluate([out], corpus["test"], arch="small-cnn", epochs=8, resolution=28, pad=0, seeds=[0, 1, 2])
    return {"success": success, "rounds": rounds, "victims": victims, "log": text}


def test_two_workers_follow_one_worker_and_protect_as_well(corpus, tmp_path):
    started = [_start(corpus, tmp_path, 1), _start(corpus, tmp_path, 2)]
    try:
        two = _finish(started[1], corpus)
        one = _finish(started[0], corpus)
    finally:
        for run in started:
            run["proc"].kill()
    assert "starting 2 worker(s)" in two["log"] and "process group gloo" in two["log"]
    for run in (one, two):
        assert run["success"]["stop_reason"] == "stop_rule", run["success"]
        assert run["success"]["protection"]["holds"] is True
    n1, n2 = one["success"]["rounds"], two["success"]["rounds"]
    assert n2 <= n1 + 2, f"the pool needed {n2} rounds, one worker {n1}"
    v1 = statistics.fmean(one["victims"]["test_accuracy"])
    v2 = statistics.fmean(two["victims"]["test_accuracy"])
    assert abs(v1 - v2) <= 0.05, f"victims: {v1:.3f} on one worker's release, {v2:.3f} on the pool's"
    assert max(v1, v2) <= 0.45
    # Round by round, the same trajectory: the training loss and the error on released data. (Measured here: equal
    # losses to 0.002 and errors to 0.015 in every round; the pool of per-worker batch norm was 0.18 off in round 4.
    # The margins leave room for float32 differences that a few rounds of training amplify on another CPU.)
    for a, b in zip(one["rounds"], two["rounds"]):
        assert abs(a["train"]["loss"] - b["train"]["loss"]) <= 0.05 + 0.1 * a["train"]["loss"], (a, b)
        assert abs(a["error"] - b["error"]) <= 0.1, (a, b)
