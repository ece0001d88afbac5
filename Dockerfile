# GPU training image: every `unsupft <stage>` command and `unsupft-ctl` (the in-cluster driver).
# Build: docker build -t REGISTRY/unsupft:0.1.0 .   (see docs/cluster.md)
# The base pins CUDA 12.8 + cuDNN 9; torch itself is pinned by pyproject.toml (torch==2.13.0).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/unsupft PATH=/opt/unsupft/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv $VIRTUAL_ENV

WORKDIR /src
# Dependencies first (cached layer); the CUDA build of torch comes from PyTorch's cu128 index.
COPY pyproject.toml README.md ./
COPY unsupft ./unsupft
RUN pip install --extra-index-url https://download.pytorch.org/whl/cu128 "torch==2.13.0" "torchvision==0.28.0" \
 && pip install ".[gpu]" \
 && rm -rf /src

# Non-root, matching the Kubernetes securityContext (runAsUser/runAsGroup 1000).
RUN groupadd --gid 1000 unsupft && useradd --uid 1000 --gid 1000 --create-home unsupft
USER 1000:1000
WORKDIR /home/unsupft
ENTRYPOINT ["unsupft"]
CMD ["--help"]
