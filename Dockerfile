# GPU training image: every `unsupft <stage>` command and `unsupft-ctl`.
# Build: docker build -t REGISTRY/unsupft:0.1.0 .   (see docs/cluster.md)
# The default base pins CUDA 12.8 + cuDNN 9 (override with --build-arg BASE_IMAGE=...); torch itself
# is pinned by pyproject.toml (torch==2.13.0).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/unsupft PATH=/opt/unsupft/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv $VIRTUAL_ENV

WORKDIR /src
# Dependencies from the package metadata alone: this multi-GB layer is rebuilt when pyproject.toml
# changes, not with every source change. The CUDA build of torch comes from PyTorch's cu128 index.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
 && pip install --extra-index-url https://download.pytorch.org/whl/cu128 -r /tmp/requirements.txt

# The package itself, last (seconds to rebuild).
COPY README.md ./
COPY unsupft ./unsupft
RUN pip install --no-deps . && rm -rf /src /tmp/requirements.txt

# Non-root, matching the Kubernetes securityContext (runAsUser/runAsGroup 1000).
RUN groupadd --gid 1000 unsupft && useradd --uid 1000 --gid 1000 --create-home unsupft
USER 1000:1000
WORKDIR /home/unsupft
ENTRYPOINT ["unsupft"]
CMD ["--help"]
