# GPU image: the PyPI torch 2.14.1 wheel bundles its CUDA runtime, so a CUDA base with the
# driver libraries is enough. Run with the NVIDIA container toolkit (`docker run --gpus all`).
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    NO_ALBUMENTATIONS_UPDATE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common git \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/covidct
COPY pyproject.toml README.md ./
COPY src ./src
# The same install steps as the README.
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
 && /opt/venv/bin/pip install -e .
ENV PATH=/opt/venv/bin:$PATH

COPY . .
RUN dvc config core.analytics false

# params.yaml reads the data from ../shared/data: mount it at /opt/shared/data (read-only),
# and keep mlruns/ and the DVC cache outside the container: see the README.
CMD ["dvc", "repro"]
