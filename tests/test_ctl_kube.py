"""The Kubernetes backend without a cluster, as honestly as this machine allows:

- every rendered core object validated against the official Kubernetes schemas, strict
  (kubernetes-validate; unknown fields are errors);
- every PyTorchJob against the full training-operator v1.9.0 CRD, every TrainJob against the
  full Kubeflow Trainer v2.3.0 CRD (tests/data/crds, unknown fields rejected), pod templates also
  as core PodTemplateSpecs, plus the operators' webhook rules we know of;
- what the objects say about retries (by cause), deadlines, ownership and pod plumbing.

The driver's behaviour against an API server that fails is in tests/test_ctl_kube_driver.py.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from unsupft.ctl import kube, spec
from unsupft.errors import UserError

K8S_VERSION = "1.33.0"
CRDS = Path(__file__).parent / "data" / "crds"

PIPELINE = """\
name: kt
store: {store}
datasets: {{src: s3://bucket/data/src}}
stages:
  base: {{kind: pretrain, data: [src], arch: resnet50, steps: 100}}
  adapt: {{kind: adapt, init: base, target: src, mix: cutmix}}
  lab: {{kind: label, init: adapt, data: src, budget: 20}}
resources:
  defaults: {{image: "registry.example/unsupft:0.1", cpu: 4, memory: 16Gi, deadline_s: 7200, pending_timeout_s: 600,
             node_selector: {{pool: gpu}}, tolerations: [{{key: gpu, operator: Exists, effect: NoSchedule}}],
             env: {{NCCL_DEBUG: WARN}}, labels: {{team: vision}}, annotations: {{example.com/cost: research}},
             service_account: s3-reader, image_pull_secrets: [regcred], queue: gpu-queue}}
  base: {{gpus: 8, nodes: 2, procs_per_node: 8, retries: 1, env: {{NCCL_IB_DISABLE: "1"}}}}
  adapt: {{gpus: 1, retries: 1, priority_class: high}}
"""


def _strict(schema):
    """Reject unknown fields wherever the CRD does not preserve them (as the API server prunes)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        schema.pop("x-kubernetes-int-or-string", None)
        if schema.get("type") == "object" and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        schema.pop("x-kubernetes-preserve-unknown-fields", None)
        schema.pop("format", None)
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_schema(kind: str) -> tuple[str, dict]:
    """(apiVersion, strict schema) of the served version of a vendored upstream CRD, by kind."""
    for path in CRDS.glob("*.yaml"):
        crd = next(d for d in yaml.safe_load_all(path.read_text()) if d)
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["served"])
            return f"{crd['spec']['group']}/{version['name']}", _strict(version["schema"]["openAPIV3Schema"])
    raise KeyError(kind)


def validate_core(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_crd(obj):
    api_version, schema = crd_schema(obj["kind"])
    assert obj["apiVersion"] == api_version
    jsonschema.validate(obj, schema)


def _pod_template(template):
    validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


def validate_pytorchjob(obj):
    validate_crd(obj)
    replicas = obj["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1  # webhook: exactly one Master
    for rspec in replicas.values():
        names = [c["name"] for c in rspec["template"]["spec"]["containers"]]
        assert "pytorch" in names  # webhook: the operator finds the training container by this name
        _pod_template(rspec["template"])


def validate_trainjob(obj):
    validate_crd(obj)
    assert len(obj["metadata"]["name"]) <= 63 and obj["metadata"]["name"][0].isalpha()  # DNS-1035 (webhook)
    for patch in obj["spec"].get("runtimePatches", []):
        for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            pod = job["template"]["spec"]["template"]
            assert "containers" not in pod["spec"]  # env and resources of `node` go through spec.trainer
            _pod_template({**pod, "spec": {**pod["spec"], "containers": [{"name": "node", "image": "x"}]}})


def validate_any(obj):
    {"PyTorchJob": validate_pytorchjob, "TrainJob": validate_trainjob}.get(obj["kind"], validate_core)(obj)


def _pipeline(store="s3://bucket/store", text=PIPELINE):
    return spec.parse(text.format(store=store), "kt.yaml")


def _ctx(**kw):
    return kube.Context("kt", "ml", "store-creds", {"AWS_ENDPOINT_URL": "http://s3.local"}, "s3://bucket/store/runs/kt",
                        owner={"apiVersion": "v1", "kind": "ConfigMap", "name": "kt-run", "uid": "0000-1"}, **kw)


@pytest.mark.parametrize("job_api", ["trainjob", "pytorchjob"])
def test_rendered_objects_pass_the_official_schemas(job_api):
    objs = kube.render(_pipeline(), _ctx(job_api=job_api), "img:1")
    kinds = [o["kind"] for o in objs]
    assert kinds == ["ConfigMap", "Job", "TrainJob" if job_api == "trainjob" else "PyTorchJob", "Job", "Job"]
    for obj in objs:
        validate_any(obj)
        assert obj["metadata"]["labels"][kube.LABEL_RUN] == "kt"
    configmap, driver, base, adapt, lab = objs
    assert "AWS" not in str(configmap["data"])  # no credentials in the owner object
    assert driver["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["drive", "kt"]
    c = adapt["spec"]["template"]["spec"]["containers"][0]
    assert c["envFrom"] == [{"secretRef": {"name": "store-creds"}}]
    assert all("valueFrom" not in e and "KEY" not in e["name"] for e in c["env"])  # no credentials by value
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    if job_api == "pytorchjob":
        master = base["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        assert master["command"][:5] == ["unsupft", "launch", "--nproc-per-node", "8", "pretrain"]
        assert base["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
        assert master["resources"]["limits"]["nvidia.com/gpu"] == "8"
    else:
        trainer = base["spec"]["trainer"]
        assert trainer["command"][:3] == ["unsupft", "launch", "pretrain"]  # PET_* from the torch plugin
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
        assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
        assert base["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": "unsupft"}
    for obj in objs[1:]:
        text = str(obj)
        assert "rdzv" not in text and "nnodes" not in text


def test_retries_by_cause_deadlines_and_ownership():
    _, driver, trainjob, adapt, lab = kube.render(_pipeline(), _ctx(), "img:1")
    pytorchjob = kube.render(_pipeline(), _ctx(job_api="pytorchjob"), "img:1")[2]
    for job in (adapt, lab):
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [2, 75]
        assert job["spec"]["activeDeadlineSeconds"] == 7200
    run_policy = pytorchjob["spec"]["runPolicy"]
    assert run_policy["cleanPodPolicy"] == "Running" and run_policy["activeDeadlineSeconds"] == 7200
    assert {r["restartPolicy"] for r in pytorchjob["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}
    assert trainjob["spec"]["activeDeadlineSeconds"] == 7200
    assert driver["spec"]["activeDeadlineSeconds"] == kube.DRIVER_DEADLINE_S == 30 * 24 * 3600
    assert driver["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert driver["spec"]["podFailurePolicy"]["rules"] == [  # another live driver holds the run: no retries
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "driver", "operator": "In", "values": [kube.EXIT_DRIVER_HELD]}}]
    for obj in (driver, trainjob, pytorchjob, adapt, lab):
        assert obj["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "ConfigMap", "name": "kt-run", "uid": "0000-1"}]
        assert obj["metadata"]["annotations"][kube.ANNOTATION_RUN] == "s3://bucket/store/runs/kt"


def test_every_object_kueue_manages_goes_into_the_runs_queue():
    """Kueue reads the queue label on top-level objects; under `manageJobsWithoutQueueName: true` a
    driver Job without it would be suspended for ever, so it goes into the run's default queue."""
    configmap, driver, trainjob, adapt, lab = kube.render(_pipeline(), _ctx(), "img:1")
    pytorchjob = kube.render(_pipeline(), _ctx(job_api="pytorchjob"), "img:1")[2]
    for obj in (driver, trainjob, pytorchjob, adapt, lab):
        assert obj["metadata"]["labels"][kube.QUEUE_LABEL] == "gpu-queue", obj["kind"]
    assert kube.QUEUE_LABEL not in configmap["metadata"]["labels"]  # not a workload
    text = PIPELINE.replace(", queue: gpu-queue", "").replace("adapt: {{gpus: 1,", "adapt: {{queue: adapt-queue, gpus: 1,")
    _, driver, trainjob, adapt, lab = kube.render(_pipeline(text=text), _ctx(), "img:1")
    assert adapt["metadata"]["labels"][kube.QUEUE_LABEL] == "adapt-queue"  # a stage's own queue is not the run's
    assert not any(kube.QUEUE_LABEL in o["metadata"]["labels"] for o in (driver, trainjob, lab))


def test_pod_plumbing_reaches_every_kind():
    _, _, trainjob, adapt, lab = kube.render(_pipeline(), _ctx(), "img:1")
    pytorchjob = kube.render(_pipeline(), _ctx(job_api="pytorchjob"), "img:1")[2]
    pod = adapt["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "vision" and pod["metadata"]["annotations"] == {"example.com/cost": "research"}
    assert pod["spec"]["priorityClassName"] == "high" and "priorityClassName" not in lab["spec"]["template"]["spec"]
    assert pod["spec"]["serviceAccountName"] == "s3-reader" and pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in pod["spec"]["containers"][0]["env"]
    for obj in (trainjob, pytorchjob, adapt):
        assert obj["metadata"]["labels"][kube.QUEUE_LABEL] == "gpu-queue"
    master = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert {"name": "NCCL_IB_DISABLE", "value": "1"} in master["spec"]["containers"][0]["env"]
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in master["spec"]["containers"][0]["env"]  # defaults merged in
    env = {e["name"]: e["value"] for e in trainjob["spec"]["trainer"]["env"]}
    assert env["NCCL_IB_DISABLE"] == "1" and env["AWS_ENDPOINT_URL"] == "http://s3.local"
    patch = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    tpod = patch["template"]["spec"]["template"]
    assert tpod["metadata"]["labels"][kube.LABEL_STAGE] == "base" and tpod["metadata"]["annotations"]["example.com/cost"] == "research"
    assert tpod["spec"]["serviceAccountName"] == "s3-reader" and tpod["spec"]["tolerations"][0]["key"] == "gpu"


def test_trainjob_on_a_cluster_wide_runtime():
    text = PIPELINE.replace("base: {{gpus: 8,", "base: {{runtime: team-torch, runtime_kind: ClusterTrainingRuntime, gpus: 8,")
    trainjob = kube.render(_pipeline(text=text), _ctx(), "img:1")[2]
    validate_trainjob(trainjob)
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "team-torch"}
    with pytest.raises(UserError, match="runtime_kind: expected one of TrainingRuntime, ClusterTrainingRuntime"):
        _pipeline(text=text.replace("runtime_kind: ClusterTrainingRuntime", "runtime_kind: Runtime"))


def test_trainjob_refuses_a_priority_class_it_cannot_carry():
    text = PIPELINE.replace("base: {{gpus: 8,", "base: {{priority_class: high, gpus: 8,")
    with pytest.raises(UserError, match="priority_class cannot be set on a TrainJob"):
        kube.render(_pipeline(text=text), _ctx(), "img:1")
    kube.render(_pipeline(text=text), _ctx(job_api="pytorchjob"), "img:1")  # the PyTorchJob pod can


def test_schema_checks_catch_mistakes():
    """The validators used above do reject what the API server or the operator would."""
    objs = kube.render(_pipeline(), _ctx(job_api="pytorchjob"), "img:1")
    typo = copy.deepcopy(objs[2])
    typo["spec"]["runPolicy"]["ttlSecondsAfterFinish"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_pytorchjob(typo)
    bad_policy = copy.deepcopy(objs[2])
    bad_policy["spec"]["runPolicy"]["backoffLimit"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        validate_pytorchjob(bad_policy)
    renamed = copy.deepcopy(objs[2])
    renamed["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(AssertionError):
        validate_pytorchjob(renamed)
    trainjob = kube.render(_pipeline(), _ctx(), "img:1")[2]
    bad = copy.deepcopy(trainjob)
    bad["spec"]["trainer"]["numProcsPerNode"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate_trainjob(bad)
    bad = copy.deepcopy(trainjob)
    bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["priorityClassName"] = "x"
    with pytest.raises(jsonschema.ValidationError):  # not among the pod fields runtimePatches allow
        validate_trainjob(bad)
    job = objs[3]
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(job)


@pytest.mark.parametrize("field, value, message", [
    ("gpus: 8, nodes: 2, procs_per_node: 8", "gpus: 4, nodes: 2, procs_per_node: 8", "4 GPUs for 8 processes per node"),
    ("retries: 1, env", "retries: 1, deadline_s: 0, env", "out of range: 0"),
    ("env: {{NCCL_IB_DISABLE: \"1\"}}", "env: {{NCCL_IB_DISABLE: 1}}", "keys and values are strings"),
    ("env: {{NCCL_IB_DISABLE: \"1\"}}", "env: {{NCCL-IB: \"1\"}}", "environment variable names"),
    ("retries: 1, env", "retries: 1, job_api: mpijob, env", "expected one of auto, trainjob, pytorchjob"),
    ("name: kt", "name: 1kt", "DNS-1035"),
    ("labels: {{team: vision}}", "labels: {{team: vision team}}", "label values are at most 63"),
    ("queue: gpu-queue", "queue: gpu/queue", "label values are at most 63"),
])
def test_bad_cluster_settings_are_caught_at_validate_time(field, value, message):
    text = PIPELINE.replace(field, value)
    assert text != PIPELINE
    with pytest.raises(UserError, match=message) as err:
        _pipeline(text=text)
    assert str(err.value).startswith("kt.yaml:")  # file:line


def test_long_names_stay_valid_object_names():
    name = kube.object_name("a" * 40, "stage-with-a-long-name", "12")
    assert len(name) <= 52 and name[0].isalpha() and not name.endswith("-")
    assert name != kube.object_name("a" * 40, "stage-with-a-long-nameX", "12")


def test_chosen_source_reaches_the_pod_as_a_marker_the_stage_resolves():
    """The in-cluster stage gets `chosen:<select-source output>` like the local one: the pod's
    `unsupft` reads the choice from the store, so neither the driver nor the submit needs it."""
    text = PIPELINE.replace(
        "  lab: {{kind: label, init: adapt, data: src, budget: 20}}",
        "  choose: {{kind: select-source, init: base, candidate: {{src: src, tgt: s3://bucket/data/tgt}}, probe_train: src, shots: 2}}\n"
        "  lab: {{kind: label, init: adapt, data: choose.chosen, budget: 20}}")
    objs = kube.render(_pipeline(text=text), _ctx(), "img:1")
    lab = next(o for o in objs if o["metadata"]["labels"].get(kube.LABEL_STAGE) == "lab")
    validate_any(lab)
    command = lab["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--data") + 1] == "chosen:s3://bucket/store/runs/kt/choose"
