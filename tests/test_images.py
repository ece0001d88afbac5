"""The Dockerfiles, parsed (dockerfile-parse, not regular expressions) since no container engine
runs here: what makes them cacheable, configurable and safe on a platform.

- the base image is a build argument with a pinned default;
- dependencies are installed from pyproject.toml alone, before any source is copied, so a code
  change rebuilds seconds of layers instead of the torch layer; the package goes last, --no-deps;
- the image runs as uid/gid 1000 (the pods' securityContext);
- the driver image installs only what `unsupft-ctl drive` imports, and that is enough.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.driver_image import NOT_IN_DRIVER_IMAGE

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"Dockerfile": "unsupft", "images/cpu.Dockerfile": "unsupft", "images/driver.Dockerfile": "unsupft-ctl"}


def _instructions(name: str) -> list[tuple[str, str]]:
    parsed = DockerfileParser(path=str(ROOT / name))
    return [(s["instruction"], s["value"]) for s in parsed.structure if s["instruction"] != "COMMENT"]


@pytest.mark.parametrize("name", IMAGES)
def test_base_image_is_a_pinned_build_argument(name):
    steps = _instructions(name)
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")  # before FROM: usable in FROM
    default = steps[0][1].split("=", 1)[1]
    assert ":" in default and not default.endswith(":latest")
    assert [v for i, v in steps if i == "FROM"] == ["${BASE_IMAGE}"]
    assert DockerfileParser(path=str(ROOT / name)).baseimage == default


@pytest.mark.parametrize("name", IMAGES)
def test_dependencies_are_a_layer_the_source_does_not_touch(name):
    steps = _instructions(name)
    copies = [(n, v.split()[0]) for n, (i, v) in enumerate(steps) if i in ("COPY", "ADD")]
    assert copies[0][1] == "pyproject.toml"  # the first thing copied is the metadata alone
    source = next(n for n, what in copies if what in ("unsupft", "."))
    deps = [n for n, (i, v) in enumerate(steps) if i == "RUN" and "pip install" in v and "-r /tmp/requirements.txt" in v]
    assert deps and copies[0][0] < deps[0] < source  # installed between the two COPYs
    last_install = max(n for n, (i, v) in enumerate(steps) if i == "RUN" and "pip install" in v)
    assert last_install > source and "--no-deps" in steps[last_install][1]


@pytest.mark.parametrize("name, entrypoint", IMAGES.items())
def test_non_root_with_the_expected_entrypoint(name, entrypoint):
    steps = _instructions(name)
    assert [v for i, v in steps if i == "USER"][-1] == "1000:1000"
    assert json.loads([v for i, v in steps if i == "ENTRYPOINT"][-1]) == [entrypoint]


def test_torch_is_pinned_where_the_images_take_it_from():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps and "torchvision==0.28.0" in deps


def test_the_driver_image_has_no_torch_and_needs_none():
    driver_deps = DockerfileParser(path=str(ROOT / "images/driver.Dockerfile")).args["DRIVER_DEPS"].split()
    assert not {"torch", "torchvision", "faiss-cpu", "scikit-learn", "numpy"} & set(driver_deps)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[^A-Za-z0-9_.-]", d)[0].lower() for d in deps}
    assert set(driver_deps) <= names  # each pinned in pyproject.toml
    # Everything but those made unimportable: the driver's commands still load and check a pipeline.
    assert set(NOT_IN_DRIVER_IMAGE) >= {"torch", "torchvision", "numpy", "sklearn", "faiss"}
    result = subprocess.run([sys.executable, "-m", "tests.driver_image", "validate", "jobs/imagenet-multinode.yaml"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: imagenet-multinode: 3 stages")
