"""Every example pipeline in jobs/ validates, and its Kubernetes rendering passes the schemas."""

from __future__ import annotations

from pathlib import Path

import pytest

from unsupft.ctl import kube, spec
from unsupft.ctl.command import check_options
from tests.test_ctl_kube import validate_any

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


def test_the_examples_are_there():
    assert {p.name for p in JOBS} >= {"demo.yaml", "hpt.yaml", "tup-label.yaml", "coin-bituning.yaml", "imagenet-multinode.yaml"}


@pytest.mark.parametrize("job_api", ["trainjob", "pytorchjob"])
@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_example_validates_and_renders(path, job_api):
    pipeline = spec.load(path)
    check_options(pipeline, str(path))  # checks option names once the stage commands are installed
    objs = kube.render(pipeline, kube.Context(pipeline.name, "ml", "store-creds", job_api=job_api), "img:1")
    for obj in objs:
        validate_any(obj)
    if path.name == "imagenet-multinode.yaml":
        base = next(o for o in objs if o["metadata"]["labels"].get(kube.LABEL_STAGE) == "base")
        if job_api == "pytorchjob":
            assert base["kind"] == "PyTorchJob" and base["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
        else:
            assert base["kind"] == "TrainJob" and base["spec"]["trainer"]["numNodes"] == 4
