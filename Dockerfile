# The image a Ray cluster runs (deploy/ uses it): CUDA runtime, Python 3.11, the pinned dependencies, the project.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/unlearnable
# Dependencies first (the pins live in pyproject.toml), so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
COPY ops ops
COPY surrogates surrogates
COPY pipeline pipeline
RUN pip install --upgrade pip && pip install .

ENTRYPOINT ["unlearnable"]
