# The driver image: `unsupft-ctl` only, without torch and the other training libraries (tens of MB
# instead of GBs; the driver Job's memory stays small). Build from the repository root:
#   docker build -f images/driver.Dockerfile -t REGISTRY/unsupft-driver:0.1.0 .
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV VIRTUAL_ENV=/opt/unsupft PATH=/opt/unsupft/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN python -m venv $VIRTUAL_ENV

WORKDIR /src
# The driver's dependencies, as pinned in pyproject.toml (cached until it changes).
ARG DRIVER_DEPS="click boto3 python-dateutil kubernetes pyyaml"
COPY pyproject.toml ./
RUN python -c "import re, sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if re.split(r'[^A-Za-z0-9_.-]', d)[0].lower() in sys.argv[1:]))" $DRIVER_DEPS > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# The package itself, last, without its training dependencies.
COPY README.md ./
COPY unsupft ./unsupft
RUN pip install --no-deps . && rm -rf /src /tmp/requirements.txt

RUN groupadd --gid 1000 unsupft && useradd --uid 1000 --gid 1000 --create-home unsupft
USER 1000:1000
WORKDIR /home/unsupft
ENTRYPOINT ["unsupft-ctl"]
CMD ["--help"]
