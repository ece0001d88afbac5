# CPU image: the same commands without CUDA (small clusters, CI).
# Build from the repository root: docker build -f images/cpu.Dockerfile -t REGISTRY/unsupft:0.1.0-cpu .
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV VIRTUAL_ENV=/opt/unsupft PATH=/opt/unsupft/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN python -m venv $VIRTUAL_ENV

WORKDIR /src
# Dependencies from the package metadata alone (cached until pyproject.toml changes); the CPU
# wheel of the pinned torch (a plain `pip install` would pull the CUDA build).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements.txt

# The package itself, last.
COPY README.md ./
COPY unsupft ./unsupft
RUN pip install --no-deps . && rm -rf /src /tmp/requirements.txt

RUN groupadd --gid 1000 unsupft && useradd --uid 1000 --gid 1000 --create-home unsupft
USER 1000:1000
WORKDIR /home/unsupft
ENTRYPOINT ["unsupft"]
CMD ["--help"]
