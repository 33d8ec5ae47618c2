# The image a Ray cluster runs (deploy/ uses it): Python 3.11, the pinned dependencies, the project.
# No CUDA base: the pinned torch wheel is a CUDA 13.0 build that brings its own CUDA libraries (the nvidia-* wheels);
# the host provides only the NVIDIA driver (>= 580), which the NVIDIA container runtime mounts in (`--gpus all`,
# or the Kubernetes device plugin).
FROM python:3.11-slim

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# rsync: the Ray cluster launcher's docker mode copies files into the container with `rsync -e 'docker exec -i'`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends rsync \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/unlearnable
# Dependencies first, from pyproject.toml alone (its pins), so a code change does not reinstall torch and Ray.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# Then the project itself, without touching the dependencies installed above.
COPY README.md ./
COPY ops ops
COPY surrogates surrogates
COPY pipeline pipeline
COPY tools tools
RUN pip install --no-deps .

# No ENTRYPOINT: KubeRay and the cluster launcher pass their own commands (`ray start ...`, `bash`), which must run as
# themselves. `docker run IMAGE` alone prints the CLI's help; `docker run IMAGE unlearnable protect ...` runs it.
CMD ["unlearnable", "--help"]
