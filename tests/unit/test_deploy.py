"""The cluster recipes, run the way their launchers run them: the RayJob's entrypoint through the shell that KubeRay's
submitter composes, the cluster-launcher YAML against the schema shipped inside the pinned Ray, the RayJob against
KubeRay's CRD, and the image's command as Docker resolves it. Plus: the commands are ones our CLI accepts, and no
credential is written into any recipe."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib

import jsonschema
import pytest
import ray
import yaml

from pipeline.cli import build_parser, config_from_args
from pipeline.executor import ray_pool as pool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
RAYJOB_SCHEMA = os.path.join(DATA, "kuberay-v1.7.0-rayjob-v1.schema.json")
PATTERN = "s3://my-bucket/raw/train-{000000..000999}.tar"


def _yaml(name: str) -> dict:
    with open(os.path.join(DEPLOY, name)) as f:
        return yaml.safe_load(f)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _json(path) -> dict | list:
    with open(path) as f:
        return json.load(f)


def _project_dependencies() -> list[str]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


# --- Dockerfile ---------------------------------------------------------------------------------------------------


def dockerfile_instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in _read(path).splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
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


def _docker_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD as Docker reads them: exec form (a JSON array) as is, shell form as ``/bin/sh -c <string>``."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return ["/bin/sh", "-c", args]


def effective_command(steps: list[tuple[str, str]], command: list[str] | None) -> list[str]:
    """What the container runs for ``docker run IMAGE <command...>`` (Docker's rules): ENTRYPOINT + (the given
    command, or else CMD). A shell-form ENTRYPOINT ignores both (``sh -c`` takes only its string)."""
    entrypoint = cmd = None
    for word, args in steps:  # the last of each wins
        if word == "ENTRYPOINT":
            entrypoint = _docker_form(args)
        elif word == "CMD":
            cmd = _docker_form(args)
    tail = command if command is not None else (cmd or [])
    if entrypoint is None:
        return tail
    if entrypoint[:2] == ["/bin/sh", "-c"] and len(entrypoint) == 3:
        return entrypoint
    return entrypoint + tail


def _pins() -> dict[str, str]:
    deps = _project_dependencies()
    return {re.split(r"[\[=<>]", d)[0].lower(): d.split("==", 1)[1] for d in deps if "==" in d}


def test_dockerfile_caches_the_pinned_dependencies_in_their_own_layer_then_installs_the_project_without_deps():
    steps = dockerfile_instructions(os.path.join(REPO, "Dockerfile"))
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "ENTRYPOINT", "CMD", "ARG", "LABEL", "USER"}
    assert {word for word, _ in steps} <= known
    # The torch wheel is a CUDA 13.0 build with its own CUDA libraries: a plain base, or a CUDA >= 13 one.
    base = steps[0][1]
    assert steps[0][0] == "FROM"
    if base.startswith("nvidia/cuda:"):
        assert int(base.split(":")[1].split(".")[0]) >= 13, base
    else:
        assert re.match(r"(python:3\.11|ubuntu:|debian:)", base), base
    pins = _pins()
    assert pins["torch"] == "2.14.1" and pins["ray"] == "2.60.0"

    copies = [(i, args.split()[:-1]) for i, (word, args) in enumerate(steps) if word == "COPY"]
    runs = [(i, args) for i, (word, args) in enumerate(steps) if word == "RUN"]
    first_code = min(i for i, srcs in copies if srcs != ["pyproject.toml"])
    # Before any code: only pyproject.toml is copied, and a RUN installs the dependencies from it.
    early = [src for i, srcs in copies if i < first_code for src in srcs]
    assert early == ["pyproject.toml"], early
    dep_runs = [args for i, args in runs if i < first_code and "pip install" in args]
    assert dep_runs and "pyproject.toml" in dep_runs[-1], "dependencies are not installed from pyproject.toml alone"
    assert not re.search(r"pip install (--[\w-]+ )*\.(\s|$)", " ".join(dep_runs)), "the project is installed early"
    # After the code: the project itself, with --no-deps (so the dependency layer above stays the only one).
    code = {src for i, srcs in copies if i >= first_code for src in srcs}
    assert {"ops", "surrogates", "pipeline", "README.md"} <= code  # README.md: pyproject's readme
    late = [args for i, args in runs if i > first_code and "pip install" in args]
    assert late and re.search(r"pip install (--[\w-]+ )*--no-deps (--[\w-]+ )*\.(\s|$)", late[-1]), late
    # No pins of its own that could drift from pyproject's.
    all_runs = " && ".join(args for _, args in runs)
    for name, version in re.findall(r"([A-Za-z0-9_.\-\[\]]+)==([\w.]+)", all_runs):
        base_name = name.split("[")[0].lower()
        assert pins.get(base_name) == version, f"Dockerfile pins {name}=={version}, pyproject: {pins.get(base_name)}"
    # The cluster launcher's docker mode copies files into the container with rsync.
    assert re.search(r"apt-get install [^&]*\brsync\b", all_runs)


def test_dependency_layer_reads_exactly_pyprojects_dependencies():
    """Run the dependency-extraction command of the Dockerfile here, on the real pyproject.toml."""
    steps = dockerfile_instructions(os.path.join(REPO, "Dockerfile"))
    run = next(args for word, args in steps if word == "RUN" and "tomllib" in args)
    extract = shlex.split(run.split(">")[0])
    assert extract[0] == "python" and extract[1] == "-c"
    out = subprocess.run([sys.executable, "-c", extract[2]], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == _project_dependencies()


@pytest.mark.parametrize(
    "command",
    [
        ["ray", "start", "--head", "--port=6379", "--num-gpus=0", "--block"],  # KubeRay-style / launcher start commands
        ["bash", "-lc", "ray start --address=10.0.0.1:6379 --block"],
        ["bash"],  # the cluster launcher's `docker run ... IMAGE bash`
        ["unlearnable", "protect", "--input", PATTERN, "--output", "s3://b/out"],
    ],
)
def test_the_image_runs_a_launchers_command_as_itself(command):
    steps = dockerfile_instructions(os.path.join(REPO, "Dockerfile"))
    assert effective_command(steps, command) == command
    default = effective_command(steps, None)
    assert default and default[0] == "unlearnable"  # `docker run IMAGE` alone: the CLI


def test_effective_command_models_dockers_entrypoint_rules():
    """The helper above would catch the defect it is there for."""
    assert effective_command([("ENTRYPOINT", '["unlearnable"]')], ["ray", "start"]) == ["unlearnable", "ray", "start"]
    assert effective_command([("ENTRYPOINT", "unlearnable"), ("CMD", '["x"]')], ["bash"])[:2] == ["/bin/sh", "-c"]
    assert effective_command([("CMD", "unlearnable --help")], None) == ["/bin/sh", "-c", "unlearnable --help"]


# --- RayJob (KubeRay) ---------------------------------------------------------------------------------------------


def _shim(bin_dir: str, name: str, body: str) -> None:
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\n{body}")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def kuberay_submitter_script(spec: dict, address: str, job_id: str) -> str:
    """The submitter's shell script for a RayJob in K8sJobMode, as KubeRay v1.7.0's ``BuildJobSubmitCommand``
    (ray-operator/controllers/ray/common/job.go) composes it: words joined by spaces, the entrypoint (trimmed) as
    one word after ``--``, the runtime env as a Go-quoted JSON string; the container runs it as
    ``/bin/bash -ce -- <script>``. (The dashboard health wait loop before it is left out.)"""
    cmd = ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        runtime_env = json.dumps(yaml.safe_load(spec["runtimeEnvYAML"]), separators=(",", ":"))
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]  # Go's strconv.Quote, for ASCII
    cmd += ["--submission-id", job_id, "--", spec["entrypoint"].strip(), ";", "fi", ";"]
    cmd += ["ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(cmd)


def run_entrypoint_as_kuberay_does(spec: dict, tmp_path) -> list[str]:
    """The argv `unlearnable` gets: the submitter script through ``bash -ce`` with a ``ray`` shim that records what
    `ray job submit` receives; then the entrypoint Ray's CLI makes of it (``shlex.join`` of the words after ``--``)
    run on the head the way Ray's job supervisor does (``Popen(entrypoint, shell=True)``), with an ``unlearnable``
    shim that records its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "submit.json"
    _shim(
        str(bin_dir),
        "ray",
        f"""import json, sys
argv = sys.argv[1:]
if argv[:2] == ["job", "status"]:
    sys.exit(1)  # not submitted yet
if argv[:2] == ["job", "submit"]:
    json.dump(argv, open({str(record)!r}, "w"))
""",
    )
    script = kuberay_submitter_script(spec, "http://unlearnable-protect-head-svc:8265", "unlearnable-protect-abc12")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["/bin/bash", "-ce", "--", script], env=env, check=True, timeout=60)
    submit = _json(record)
    words = submit[submit.index("--") + 1 :]
    entrypoint = shlex.join(words)  # ray job submit (Ray 2.60, non-Windows)

    driver = tmp_path / "driver.json"
    _shim(str(bin_dir), "unlearnable", f"import json, sys\njson.dump(sys.argv[1:], open({str(driver)!r}, 'w'))\n")
    subprocess.run(entrypoint, shell=True, env=env, check=True, timeout=60)
    return _json(driver)


def test_rayjob_entrypoint_survives_kuberays_shells_with_the_brace_pattern_as_one_argument(tmp_path):
    spec = _yaml("rayjob.yaml")["spec"]
    argv = run_entrypoint_as_kuberay_does(spec, tmp_path)
    assert argv[0] == "protect"
    assert argv.count("--input") == 1 and argv[argv.index("--input") + 1] == PATTERN
    args = build_parser().parse_args(argv)  # exits 2 ("unrecognized arguments") if bash expanded the braces
    cfg = config_from_args(args)
    assert cfg.inputs == [PATTERN]
    assert args.output.startswith("s3://") and args.gpus_per_worker == 1


def test_the_shell_check_catches_an_unquoted_pattern(tmp_path):
    spec = dict(_yaml("rayjob.yaml")["spec"])
    spec["entrypoint"] = spec["entrypoint"].replace(f"'{PATTERN}'", PATTERN)
    argv = run_entrypoint_as_kuberay_does(spec, tmp_path)
    assert len(argv) > 1000  # bash's brace expansion: one word per shard
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_rayjob_is_valid_against_kuberays_rayjob_crd():
    schema = _json(RAYJOB_SCHEMA)
    assert "ray.io_rayjobs.yaml" in schema["$comment"] and "v1.7.0" in schema["$comment"]
    jsonschema.Draft7Validator.check_schema(schema)
    job = _yaml("rayjob.yaml")
    jsonschema.validate(job, schema)
    # The schema rejects what the API server would: an unknown (misspelt) field, a wrong type.
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["ttlSecondAfterFinished"] = 60
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["backoffLimit"] = "2"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_rayjob_runs_protect_on_gpu_workers_with_credentials_from_a_secret_and_gives_the_gpus_back():
    job = _yaml("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    args = build_parser().parse_args(shlex.split(spec["entrypoint"])[1:])
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert args.workers == workers["replicas"]
    assert container["envFrom"][0]["secretRef"]["name"]
    assert spec["rayClusterSpec"]["rayVersion"] == _pins()["ray"]
    # The GPUs go back soon after the job ends, and a failed run is retried (a rerun resumes).
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 600
    assert 1 <= spec["backoffLimit"] <= 5
    # No container overrides the command KubeRay gives it (`ray start ...`).
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    assert all("command" not in c for g in groups for c in g["template"]["spec"]["containers"])


# --- cluster launcher -----------------------------------------------------------------------------------------------


def test_cluster_yaml_is_valid_against_the_schema_in_the_pinned_ray():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    schema = _json(schema_path)
    cluster = _yaml("cluster.yaml")
    jsonschema.validate(cluster, schema)
    bad = yaml.safe_load(yaml.safe_dump(cluster))
    bad["available_node_types"]["gpu_worker"]["docker"]["run_options"] = ["--gpus all"]  # not a node-type key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_cluster_gives_gpus_to_the_gpu_workers_only_and_scales_them_to_zero():
    cluster = _yaml("cluster.yaml")
    types = cluster["available_node_types"]
    head_name = cluster["head_node_type"]
    head = types[head_name]
    assert head["resources"]["GPU"] == 0
    gpu = {name: t for name, t in types.items() if name != head_name}
    assert gpu and all(t["resources"]["GPU"] >= 1 for t in gpu.values())
    # The head's docker run gets the shared options (+ head_run_options); no GPU flag may reach it.
    docker = cluster["docker"]
    head_opts = docker.get("run_options", []) + docker.get("head_run_options", [])
    assert not any("--gpus" in o for o in head_opts), head_opts
    for t in gpu.values():  # per node type, `docker` updates the global one (Ray's autoscaler)
        merged = {**docker, **t.get("docker", {})}
        opts = merged.get("run_options", []) + merged.get("worker_run_options", [])
        assert "--gpus all" in opts, opts
        assert t.get("min_workers", 0) == 0
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", t["node_config"]["ImageId"])
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert any("--disable-usage-stats" in c for c in cluster["head_start_ray_commands"])
    text = _read(os.path.join(DEPLOY, "cluster.yaml"))
    assert "ray down deploy/cluster.yaml" in text and "Deep Learning" in text
    assert "ray down deploy/cluster.yaml" in _read(os.path.join(DEPLOY, "README.md"))


# --- runtime env, credentials -------------------------------------------------------------------------------------


def test_runtime_env_ships_no_credentials():
    env = _yaml("runtime_env.yaml")
    assert set(env) <= {"env_vars", "pip", "working_dir", "py_modules", "config"}
    for name in ("runtime_env.yaml", "rayjob.yaml", "cluster.yaml"):
        text = _read(os.path.join(DEPLOY, name))
        data = yaml.safe_load(text)
        assert "AWS_SECRET_ACCESS_KEY" not in str(data) and "aws_secret_access_key" not in str(data).lower()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)


# --- CPUs of a GPU worker -------------------------------------------------------------------------------------------


def _node(cpu: float, gpu: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}


def test_a_gpu_worker_gets_its_nodes_cpus_divided_by_its_gpus():
    head = _node(4)  # num-gpus 0: does not count
    assert pool.gpu_worker_cpus([head, _node(8, 1), _node(8, 1)], 1) == 8
    assert pool.gpu_worker_cpus([head, _node(96, 8)], 1) == 12
    assert pool.gpu_worker_cpus([head, _node(96, 8)], 2) == 24
    assert pool.gpu_worker_cpus([_node(96, 8), _node(32, 4)], 1) == 8  # the leanest GPU node decides
    assert pool.gpu_worker_cpus([_node(96, 8), _node(8, 8, alive=False)], 1) == 12
    assert pool.gpu_worker_cpus([_node(2, 4)], 1) == 1 and pool.gpu_worker_cpus([head], 1) == 1


def test_pool_size_defaults_and_overrides(monkeypatch):
    nodes = [_node(4), _node(8, 1), _node(8, 1)]
    monkeypatch.setattr(pool, "cluster_gpus", lambda: 2)
    monkeypatch.setattr(pool.ray, "nodes", lambda: nodes)
    assert pool.pool_size(None, None, None) == (2, 1, 8)
    assert pool.pool_size(None, None, 3) == (2, 1, 3)  # --cpus-per-worker wins
    # CPU-only: unchanged, this machine's cores shared out.
    monkeypatch.setattr(pool, "cluster_gpus", lambda: 0)
    monkeypatch.setattr(pool.os, "cpu_count", lambda: 8)
    assert pool.pool_size(2, None, None) == (2, 0, 4)
    assert pool.pool_size(None, None, None) == (1, 0, 8)
    assert pool.pool_size(2, None, 1.5) == (2, 0, 1.5)
