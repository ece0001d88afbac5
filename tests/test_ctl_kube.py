"""The Kubernetes backend without a cluster, as honestly as this machine allows:

- every rendered core object validated against the official Kubernetes schemas, strict
  (kubernetes-validate; unknown fields are errors);
- every PyTorchJob validated against the training operator's CRD schema (tests/data, unknown fields
  rejected) with its pod templates validated as core PodTemplateSpecs, plus the operator's webhook
  rules (container `pytorch`, exactly one Master);
- the driver's create / watch / retry / wait / cancel / restart logic against an HTTP emulator of
  the API (tests/kube_emulator.py) through the official client.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from unsupft import stage as stage_contract
from unsupft.ctl import kube, spec
from unsupft.ctl import state as st
from tests.kube_emulator import Emulator

K8S_VERSION = "1.33.0"
DATA = Path(__file__).parent / "data"

PIPELINE = """\
name: kt
store: {store}
datasets: {{src: s3://bucket/data/src}}
stages:
  base: {{kind: pretrain, data: [src], arch: resnet50, steps: 100}}
  adapt: {{kind: adapt, init: base, target: src, mix: true}}
  lab: {{kind: label, init: adapt, data: src, budget: 20}}
resources:
  defaults: {{image: "registry.example/unsupft:0.1", cpu: 4, memory: 16Gi,
             node_selector: {{pool: gpu}}, tolerations: [{{key: gpu, operator: Exists, effect: NoSchedule}}]}}
  base: {{gpus: 8, nodes: 2, procs_per_node: 8, retries: 1}}
  adapt: {{gpus: 1, retries: 1}}
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


CRD_SCHEMA = _strict(yaml.safe_load((DATA / "pytorchjob-crd.yaml").read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def validate_core(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_pytorchjob(obj):
    jsonschema.validate(obj, CRD_SCHEMA)
    replicas = obj["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1  # webhook: exactly one Master
    for rspec in replicas.values():
        names = [c["name"] for c in rspec["template"]["spec"]["containers"]]
        assert "pytorch" in names  # webhook: the operator finds the training container by this name
        validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": rspec["template"]})


def _pipeline(store="s3://bucket/store"):
    return spec.parse(PIPELINE.format(store=store), "kt.yaml")


def test_rendered_objects_pass_the_official_schemas():
    p = _pipeline()
    objs = kube.render(p, kube.Context("kt", "ml", "store-creds", {"AWS_ENDPOINT_URL": "http://s3.local"}), "img:1")
    kinds = [o["kind"] for o in objs]
    assert kinds == ["Job", "PyTorchJob", "Job", "Job"]
    for obj in objs:
        if obj["kind"] == "PyTorchJob":
            validate_pytorchjob(obj)
        else:
            validate_core(obj)
        assert obj["metadata"]["labels"][kube.LABEL_RUN] == "kt"
    driver, base, adapt, lab = objs
    assert driver["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["drive", "kt"]
    master = base["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert master["command"][:5] == ["torchrun", "--nproc-per-node", "8", "-m", "unsupft"]
    assert not any("rdzv" in a or "nnodes" in a for a in master["command"])
    assert base["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert master["resources"]["limits"]["nvidia.com/gpu"] == "8"
    c = adapt["spec"]["template"]["spec"]["containers"][0]
    assert c["envFrom"] == [{"secretRef": {"name": "store-creds"}}]
    assert all("valueFrom" not in e and "KEY" not in e["name"] for e in c["env"])  # no credentials by value
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert adapt["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert lab["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [75]


def test_schema_checks_catch_mistakes():
    """The validators used above do reject what the API server or the operator would."""
    obj = kube.render(_pipeline(), kube.Context("kt", "ml", None), "img:1")[1]
    typo = copy.deepcopy(obj)
    typo["spec"]["runPolicy"]["ttlSecondsAfterFinish"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_pytorchjob(typo)
    renamed = copy.deepcopy(obj)
    renamed["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(AssertionError):
        validate_pytorchjob(renamed)
    job = kube.render(_pipeline(), kube.Context("kt", "ml", None), "img:1")[2]
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(job)


@pytest.fixture
def cluster(tmp_path):
    """A run in a local store, an emulated API whose 'containers' write `_DONE.json`."""
    p = _pipeline(store=f"file://{tmp_path}/store")
    run = st.create(p, "kt", "kubernetes", namespace="ml")

    def container_finishes(obj):
        stage = obj["metadata"]["labels"][kube.LABEL_STAGE]
        stage_contract.write_done(run.stage_uri(stage), stage, {"s": stage}, {}, [], 0.0)

    with Emulator(on_success=container_finishes) as emu:
        cfg = client.Configuration(host=emu.url)
        api = kube.Api(client.ApiClient(cfg))
        yield p, run, emu, api


def _driver(p, run, api):
    return kube.Driver(run, p, api, kube.Context("kt", "ml", "creds"), poll_s=0.01, echo=lambda s: None)


def test_driver_runs_dag_and_retries_failed_attempt(cluster):
    p, run, emu, api = cluster
    emu.script["kt-base-1"] = ("fail", 2)
    emu.script["kt-lab-1"] = ("succeed", 3)
    assert _driver(p, run, api).execute()
    creates = [n for verb, n in emu.log if verb == "create"]
    assert creates == ["kt-base-1", "kt-base-2", "kt-adapt-1", "kt-lab-1"]  # DAG order, one retry
    saved = st.open_run(str(Path(run.uri).parents[1]), "kt")
    assert {n: (r["state"], r["attempts"]) for n, r in saved.stages.items()} == {
        "base": ("succeeded", 2), "adapt": ("succeeded", 1), "lab": ("succeeded", 1)}
    assert emu.objects[("pytorchjobs", "ml", "kt-base-2")]["kind"] == "PyTorchJob"


def test_driver_gives_up_after_retries_and_stops_downstream(cluster):
    p, run, emu, api = cluster
    emu.script["kt-adapt-1"] = ("fail", 1)
    emu.script["kt-adapt-2"] = ("fail", 1)
    assert not _driver(p, run, api).execute()
    states = {n: r["state"] for n, r in run.stages.items()}
    assert states == {"base": "succeeded", "adapt": "failed", "lab": "pending"}
    assert "BackoffLimitExceeded" in run.stages["adapt"]["message"]


def test_label_stage_waiting_for_people(cluster):
    p, run, emu, api = cluster
    emu.script["kt-lab-1"] = ("wait", 1)
    assert not _driver(p, run, api).execute()
    assert run.stages["lab"]["state"] == "waiting-for-labels"


def test_restarted_driver_adopts_instead_of_creating_again(cluster):
    p, run, emu, api = cluster
    emu.script["kt-base-1"] = ("succeed", 5)
    first = _driver(p, run, api)
    first._step()  # creates kt-base-1, then the driver "dies"
    assert ("create", "kt-base-1") in emu.log
    # Worst case: a second driver that read a stale run.json (stage still pending) adopts on 409.
    rec = run.stages["base"]
    rec.update(state=st.PENDING, attempts=0)
    again = st.Run(run.uri, run.data)
    assert _driver(p, again, api).execute()
    assert len([1 for verb, n in emu.log if verb == "create" and n == "kt-base-1"]) == 2  # second answered 409
    assert ("pytorchjobs", "ml", "kt-base-2") not in emu.objects
    assert again.stages["base"]["state"] == "succeeded" and again.stages["base"]["attempts"] == 1


def test_cancel_deletes_stage_objects(cluster):
    p, run, emu, api = cluster
    emu.script["kt-base-1"] = ("succeed", 10 ** 6)
    d = _driver(p, run, api)
    d._step()
    run.request_cancel()
    assert not d.execute()
    assert ("delete", "kt-base-1") in emu.log and not emu.objects
    assert {r["state"] for r in run.stages.values()} == {"cancelled"}
