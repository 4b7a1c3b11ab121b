# GPU image of the covidct pipeline: `docker run --gpus all ...` runs `dvc repro` (see the README's
# "Docker" section for the mounts). The PyPI torch 2.14.1 wheel is built for CUDA 13.0 and brings its own
# CUDA libraries and cuDNN, so the CUDA *base* image is enough: it adds the CUDA 13.0 driver requirement,
# the forward-compatibility libraries and the NVIDIA_* variables; the NVIDIA container toolkit mounts the driver.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive

# Python 3.11 (the project's only supported version; Ubuntu 24.04 ships 3.12) from the deadsnakes PPA, and git
# (the tracking code tags every MLflow run with the commit; DVC reads the repository).
# Versions are pinned to their release line: apt can only install what the archive's index lists now, and
# Ubuntu's security pocket and the PPA replace a patch version when they publish the next one.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common=0.99.* \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends git=1:2.43.* python3.11=3.11.* python3.11-venv=3.11.* \
 && apt-get purge -y --auto-remove software-properties-common \
 && rm -rf /var/lib/apt/lists/*

# A non-root user with UID 1000 (usually the host user who owns the bind-mounted mlruns/ and DVC cache);
# Ubuntu's image has its own `ubuntu` user with that UID.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && groupadd --gid 1000 covidct \
 && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash covidct \
 && install -d -o covidct -g covidct /opt/covidct \
 && git config --system --add safe.directory /opt/covidct

ENV NO_ALBUMENTATIONS_UPDATE=1 \
    DVC_NO_ANALYTICS=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# The README's install steps: torch and torchvision first (their own layer: the largest and the most stable),
# then the project, editable, so the code under src/ that DVC hashes is the code the stages run.
RUN python3.11 -m venv /opt/venv \
 && pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/covidct
COPY --chown=covidct:covidct pyproject.toml ./
COPY --chown=covidct:covidct src ./src
RUN pip install --no-cache-dir -e .

# The rest of the repository, .git included (a clean checkout: .dockerignore leaves out only what git ignores).
COPY --chown=covidct:covidct . .

# The user created above, by number (Kubernetes' runAsNonRoot can only check a numeric user).
USER 1000:1000
RUN mkdir -p mlruns .dvc/cache \
 && dvc config core.analytics false

# params.yaml reads the data from ../shared/data, i.e. /opt/shared/data: mount the data there, read-only.
# The MLflow store and the DVC cache outlive the container.
VOLUME ["/opt/covidct/mlruns", "/opt/covidct/.dvc/cache"]

# No HEALTHCHECK: the default command is a batch job that exits when the pipeline is done, not a service.
CMD ["dvc", "repro"]
