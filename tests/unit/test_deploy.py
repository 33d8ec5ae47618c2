"""The cluster recipes: the Dockerfile installs the project with pyproject's pins, the deploy files parse, their
commands are ones our CLI accepts, and no credential is written into any of them."""

from __future__ import annotations

import os
import re
import shlex
import tomllib

import yaml

from pipeline.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")


def dockerfile_instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in open(path).read().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _pins() -> dict[str, str]:
    deps = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["dependencies"]
    return {re.split(r"[\[=<>]", d)[0].lower(): d.split("==", 1)[1] for d in deps if "==" in d}


def test_dockerfile_builds_a_cuda_image_that_installs_the_project_with_pyprojects_pins():
    steps = dockerfile_instructions(os.path.join(REPO, "Dockerfile"))
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "ENTRYPOINT", "CMD", "ARG", "LABEL", "USER"}
    assert {word for word, _ in steps} <= known
    assert steps[0][0] == "FROM" and steps[0][1].startswith("nvidia/cuda:")
    runs = " && ".join(args for word, args in steps if word == "RUN")
    assert "python3.11" in runs
    copied = [args.split()[0] for word, args in steps if word == "COPY"]
    assert "pyproject.toml" in " ".join(copied) and {"ops", "surrogates", "pipeline"} <= set(copied)
    # The project is installed from its own pyproject (so with exactly its pins), not a list of its own.
    assert re.search(r"pip install (--[\w-]+ )*\.(\s|$)", runs)
    pins = _pins()
    assert pins["torch"] == "2.14.1" and pins["ray"] == "2.60.0"
    for name, version in re.findall(r"([A-Za-z0-9_.\-\[\]]+)==([\w.]+)", runs):
        base = name.split("[")[0].lower()
        assert pins.get(base) == version, f"Dockerfile pins {name}=={version}, pyproject.toml says {pins.get(base)}"
    assert dict(steps)["ENTRYPOINT"] == '["unlearnable"]'


def _protect_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[:2] == ["unlearnable", "protect"], argv
    return argv[1:]


def test_rayjob_manifest_runs_protect_on_gpu_workers_with_credentials_from_a_secret():
    job = yaml.safe_load(open(os.path.join(DEPLOY, "rayjob.yaml")))
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    args = build_parser().parse_args(_protect_argv(spec["entrypoint"]))  # a command our CLI accepts
    assert args.output.startswith("s3://") and args.gpus_per_worker == 1
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert args.workers == workers["replicas"]
    assert container["envFrom"][0]["secretRef"]["name"]
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_cluster_launcher_has_gpu_workers_and_an_instance_role_not_keys():
    cluster = yaml.safe_load(open(os.path.join(DEPLOY, "cluster.yaml")))
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"]["GPU"] == 0
    gpu = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert gpu and all(t["resources"]["GPU"] >= 1 for t in gpu)
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert any("--disable-usage-stats" in c for c in cluster["head_start_ray_commands"])


def test_runtime_env_ships_no_credentials():
    env = yaml.safe_load(open(os.path.join(DEPLOY, "runtime_env.yaml")))
    assert set(env) <= {"env_vars", "pip", "working_dir", "py_modules", "config"}
    for name in ("runtime_env.yaml", "rayjob.yaml", "cluster.yaml"):
        text = open(os.path.join(DEPLOY, name)).read()
        data = yaml.safe_load(text)
        assert "AWS_SECRET_ACCESS_KEY" not in str(data) and "aws_secret_access_key" not in str(data).lower()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)
