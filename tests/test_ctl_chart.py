"""The Helm chart, rendered and linted by Helm's own Go engine (helm-python-sdk), its output
validated strictly against the official Kubernetes schemas, and bad values rejected by its schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")

from tests.test_ctl_kube import validate_core  # noqa: E402

CHART = Path(__file__).resolve().parents[1] / "charts" / "unsupft"
PIPELINE = (Path(__file__).resolve().parents[1] / "jobs" / "imagenet-multinode.yaml").read_text()


def _render(values: dict, revision: int = 1) -> list[dict]:
    out = helm.Chart.load(CHART).render(values, name="inet", namespace="ml", revision=revision, is_install=True)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def test_chart_renders_valid_objects_with_least_privilege():
    objs = _render({"pipeline": PIPELINE, "storeSecret": "s3-creds", "nodeSelector": {"pool": "cpu"},
                    "tolerations": [{"key": "x", "operator": "Exists"}]}, revision=4)
    for obj in objs:
        validate_core(obj)
    by_kind = {o["kind"]: o for o in objs}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"}
    job = by_kind["Job"]
    assert job["metadata"]["name"] == "inet-driver-r4"
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    c = pod["containers"][0]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert c["command"][:3] == ["unsupft-ctl", "drive", "inet"]
    assert yaml.safe_load(by_kind["ConfigMap"]["data"]["pipeline.yaml"])["name"] == "imagenet-multinode"
    rules = by_kind["Role"]["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("batch", "jobs"), ("batch", "jobs/status"), ("kubeflow.org", "pytorchjobs"),
                       ("kubeflow.org", "pytorchjobs/status"), ("", "pods"), ("", "pods/log")}
    assert not any("*" in v for rule in rules for v in rule["verbs"])


def test_chart_lints_clean():
    result = helm.lint(CHART, {"pipeline": PIPELINE}, strict=True)
    assert result["errors"] == []
    assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]  # info only


@pytest.mark.parametrize("values", [
    {"pipeline": "x", "colour": "red"},
    {"pipeline": "x", "image": {"repository": "r", "tag": "t", "pullPolicy": "Sometimes"}},
    {"pipeline": "x", "driver": {"backoffLimit": -1}},
    {"pipeline": "x", "runId": "Bad_Name"},
    {"pipeline": "x", "store": "file:///tmp"},
])
def test_bad_values_are_rejected_by_the_schema(values):
    with pytest.raises(helm.HelmError):
        _render(values)


def test_missing_pipeline_is_an_error():
    with pytest.raises(helm.HelmError, match="set-file pipeline"):
        _render({})
