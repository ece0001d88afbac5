# CPU image: the same commands without CUDA (small clusters, CI, the driver Job).
# Build from the repository root: docker build -f images/cpu.Dockerfile -t REGISTRY/unsupft:0.1.0-cpu .
FROM python:3.11.11-slim-bookworm

ENV VIRTUAL_ENV=/opt/unsupft PATH=/opt/unsupft/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN python -m venv $VIRTUAL_ENV

WORKDIR /src
COPY pyproject.toml README.md ./
COPY unsupft ./unsupft
# The CPU wheel of the pinned torch (a plain `pip install` would pull the CUDA build).
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" "torchvision==0.28.0" \
 && pip install . \
 && rm -rf /src

RUN groupadd --gid 1000 unsupft && useradd --uid 1000 --gid 1000 --create-home unsupft
USER 1000:1000
WORKDIR /home/unsupft
ENTRYPOINT ["unsupft"]
CMD ["--help"]
