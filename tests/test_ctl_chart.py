"""The Helm chart, rendered and linted by Helm's own Go engine (helm-python-sdk), its output
validated strictly against the official Kubernetes schemas and the upstream Trainer CRDs, and bad
values rejected by its schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")

from tests.test_ctl_kube import validate_core, validate_crd  # noqa: E402
from unsupft.ctl import kube  # noqa: E402

CHART = Path(__file__).resolve().parents[1] / "charts" / "unsupft"
PIPELINE = (Path(__file__).resolve().parents[1] / "jobs" / "imagenet-multinode.yaml").read_text()


def _render_files(values: dict, name: str = "inet", revision: int = 1) -> dict[str, str]:
    return helm.Chart.load(CHART).render(values, name=name, namespace="ml", revision=revision, is_install=True)


def _render(values: dict, name: str = "inet", revision: int = 1) -> list[dict]:
    out = _render_files(values, name, revision)
    return [doc for path, text in out.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def _validate(obj: dict) -> None:
    (validate_crd if obj["kind"].endswith("TrainingRuntime") else validate_core)(obj)


def _granted(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_chart_renders_valid_objects_with_least_privilege():
    objs = _render({"pipeline": PIPELINE, "storeSecret": "s3-creds", "nodeSelector": {"pool": "cpu"},
                    "tolerations": [{"key": "x", "operator": "Exists"}]}, revision=4)
    for obj in objs:
        _validate(obj)
    by_kind = {o["kind"]: o for o in objs}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"}  # no Trainer API here: no runtime
    job = by_kind["Job"]
    assert job["metadata"]["name"] == "inet-driver-r4"
    deadline = job["spec"]["activeDeadlineSeconds"]
    assert deadline == 2592000 and isinstance(deadline, int)  # 30 days, as `unsupft-ctl submit`; not Helm's 2.592e+06
    submitted = kube.driver_job(kube.Context("inet", "ml"), "s3://b/s", "img:1")["spec"]
    assert job["spec"]["podFailurePolicy"] == submitted["podFailurePolicy"]  # exit 73 fails it, evictions do not count
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["serviceAccountName"] == "inet-driver"
    c = pod["containers"][0]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert c["image"] == "ghcr.io/unsupft/unsupft-driver:0.1.0"  # the small CPU image
    command = c["command"]
    assert command[:3] == ["unsupft-ctl", "drive", "inet"]
    assert command[command.index("--owner-configmap") + 1] == "inet-pipeline"
    assert yaml.safe_load(by_kind["ConfigMap"]["data"]["pipeline.yaml"])["name"] == "imagenet-multinode"
    role = by_kind["Role"]
    assert _granted(role) == {
        *{(g, r, v) for g, r in (("batch", "jobs"), ("trainer.kubeflow.org", "trainjobs"), ("kubeflow.org", "pytorchjobs"))
          for v in ("create", "get", "list", "delete")},
        ("", "pods", "list"), ("", "events", "list"), ("", "configmaps", "get")}
    assert next(r for r in role["rules"] if r["resources"] == ["configmaps"])["resourceNames"] == ["inet-pipeline"]


def test_rbac_only_install_serves_unsupft_ctl_submit():
    objs = _render({"pipeline": "", "rbacOnly": True, "trainingRuntime": {"enabled": True, "name": "unsupft",
                    "image": {"repository": "r/unsupft", "tag": "1"}}, "storeSecret": "s3-creds"}, name="unsupft-rbac")
    for obj in objs:
        _validate(obj)
    assert sorted(o["kind"] for o in objs) == ["Role", "RoleBinding", "ServiceAccount", "TrainingRuntime"]
    sa = next(o for o in objs if o["kind"] == "ServiceAccount")
    assert sa["metadata"]["name"] == "unsupft-driver"  # `unsupft-ctl submit`'s default --service-account
    role = next(o for o in objs if o["kind"] == "Role")
    assert "resourceNames" not in next(r for r in role["rules"] if r["resources"] == ["configmaps"])  # runs' names vary
    runtime = next(o for o in objs if o["kind"] == "TrainingRuntime")
    assert runtime["metadata"]["name"] == "unsupft"
    job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules[1]["onExitCodes"]["values"] == [2, 75]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"]
    node = pod["containers"][0]
    assert node["name"] == "node" and node["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in node["volumeMounts"]
    notes = _render_files({"pipeline": "", "rbacOnly": True}, name="unsupft-rbac")["unsupft/templates/NOTES.txt"]
    assert "unsupft-ctl submit PIPELINE.yaml --backend kubernetes --namespace ml --service-account unsupft-driver" in notes


def test_a_cluster_wide_runtime_validates_against_its_crd():
    objs = _render({"pipeline": "", "rbacOnly": True, "trainingRuntime": {"enabled": True, "kind": "ClusterTrainingRuntime"}})
    runtime = next(o for o in objs if o["kind"].endswith("TrainingRuntime"))
    assert runtime["kind"] == "ClusterTrainingRuntime" and "namespace" not in runtime["metadata"]
    _validate(runtime)


def test_notes_say_how_to_follow_the_run():
    notes = _render_files({"pipeline": PIPELINE, "store": "s3://b/u"})["unsupft/templates/NOTES.txt"]
    assert "unsupft-ctl --store s3://b/u status inet" in notes and "helm uninstall inet -n ml" in notes


def test_long_release_names_are_cut_to_63_and_run_ids_checked():
    long = "a" * 53  # helm's own release-name limit
    objs = _render({"pipeline": PIPELINE, "runId": "inet"}, name=long, revision=12)
    for obj in objs:
        _validate(obj)
        assert len(obj["metadata"]["name"]) <= 63
    assert next(o for o in objs if o["kind"] == "Job")["metadata"]["name"].endswith("-driver-r12")
    with pytest.raises(helm.HelmError, match="must be a DNS-1035 name of at most 40"):
        _render({"pipeline": PIPELINE}, name=long)  # the release name as run id: too long
    with pytest.raises(helm.HelmError, match="must be a DNS-1035 name"):
        _render({"pipeline": PIPELINE}, name="1inet")


def test_chart_lints_clean():
    for values in ({"pipeline": PIPELINE}, {"pipeline": "", "rbacOnly": True, "trainingRuntime": {
            "enabled": True, "name": "unsupft", "image": {"repository": "r", "tag": "1"}}}):
        result = helm.lint(CHART, values, strict=True)
        assert result["errors"] == []
        assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]  # info only


@pytest.mark.parametrize("values", [
    {"pipeline": "x", "colour": "red"},
    {"pipeline": "x", "image": {"repository": "r", "tag": "t", "pullPolicy": "Sometimes"}},
    {"pipeline": "x", "driver": {"backoffLimit": -1}},
    {"pipeline": "x", "driver": {"activeDeadlineSeconds": 0}},
    {"pipeline": "x", "runId": "Bad_Name"},
    {"pipeline": "x", "runId": "9lives"},
    {"pipeline": "x", "store": "file:///tmp"},
    {"pipeline": "x", "jobApi": "mpijob"},
    {"pipeline": "x", "storeEnv": {"AWS_SECRET_ACCESS_KEY": "oops"}},
    {"pipeline": "x", "tolerations": [{"key": "x", "operator": "Exists", "efect": "NoSchedule"}]},
    {"pipeline": "x", "trainingRuntime": {"enabled": "maybe", "name": "unsupft", "image": {"repository": "r", "tag": "1"}}},
    {"pipeline": "x", "serviceAccount": {"create": True, "name": "Bad"}},
    {"pipeline": "x", "kueue": {"queueName": "gpu/queue"}},
    {"pipeline": "x", "kueue": {"queue": "gpu"}},
])
def test_bad_values_are_rejected_by_the_schema(values):
    with pytest.raises(helm.HelmError):
        _render(values)


def _driver(values: dict) -> dict:
    return next(o for o in _render(values) if o["kind"] == "Job")


def test_the_driver_job_goes_into_the_runs_kueue_queue():
    assert kube.QUEUE_LABEL not in _driver({"pipeline": PIPELINE})["metadata"]["labels"]
    queued = PIPELINE.replace("  defaults:\n", "  defaults:\n    queue: gpu-queue\n", 1)
    assert "queue: gpu-queue" in queued
    assert _driver({"pipeline": queued})["metadata"]["labels"][kube.QUEUE_LABEL] == "gpu-queue"  # as `submit` does
    chosen = {"pipeline": queued, "kueue": {"queueName": "cpu-queue"}}
    assert _driver(chosen)["metadata"]["labels"][kube.QUEUE_LABEL] == "cpu-queue"  # the chart value wins
    _validate(_driver(chosen))


def test_missing_pipeline_is_an_error():
    with pytest.raises(helm.HelmError, match="set-file pipeline"):
        _render({})
