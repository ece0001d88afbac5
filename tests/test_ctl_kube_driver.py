"""The driver against an emulated API server that fails the way real ones do (tests/kube_emulator.py),
through the official client. Each failure mode checks what the user sees (`unsupft-ctl status`)
and that nothing of the run is left in the namespace after cancel or uninstall."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from kubernetes import client

from unsupft import lease
from unsupft import stage as stage_contract
from unsupft.ctl import cli, kube, kubeapi, kubedriver
from unsupft.ctl import state as st
from unsupft.errors import UserError
from tests.kube_emulator import GROUPS, USER, Emulator
from tests.test_ctl_kube import PIPELINE, _pipeline


class Cluster:
    """A run in a local store, its ConfigMap in an emulated API whose 'containers' write `_DONE.json`."""

    def __init__(self, tmp_path: Path, installed=tuple(GROUPS), text: str = PIPELINE) -> None:
        self.store = f"file://{tmp_path}/store"
        self.pipeline = _pipeline(store=self.store, text=text)
        self.run = st.create(self.pipeline, "kt", "kubernetes", namespace="ml", owner="kt-run", owner_created_by="submit",
                             service_account="unsupft-driver", driver_image="img:1")
        self.emu = Emulator(on_success=self._container_finishes, installed=installed)
        self.emu.add("serviceaccounts", "ml", {"metadata": {"name": "unsupft-driver"}})
        self.t = 0.0

    def _container_finishes(self, obj):
        stage = obj["metadata"]["labels"][kube.LABEL_STAGE]
        stage_contract.write_done(self.run.stage_uri(stage), stage, {"s": stage}, {}, [], 0.0)

    def __enter__(self):
        self.emu.__enter__()
        self.api = kubeapi.Api(client.ApiClient(client.Configuration(host=self.emu.url)), sleep=lambda s: None)
        ctx = kube.Context("kt", "ml", run_uri=self.run.uri)
        self.api.create(kube.run_configmap(ctx, self.store))
        return self

    def __exit__(self, *exc):
        self.emu.__exit__(*exc)

    def driver(self, **kw):
        kw.setdefault("poll_s", 0.0)
        kw.setdefault("echo", lambda s: None)
        return kubedriver.Driver(self.run, self.pipeline, self.api, kube.Context("kt", "ml", "creds"),
                                 clock=lambda: self.t, **kw)

    def status(self) -> str:
        result = CliRunner().invoke(cli.main, ["--store", self.store, "status", "kt"])
        assert result.exit_code == 0, result.output
        return result.output

    def states(self) -> dict[str, tuple[str, int]]:
        saved = st.open_run(self.store, "kt")
        return {n: (r["state"], r["attempts"]) for n, r in saved.stages.items()}

    def cancel_and_check_clean(self) -> None:
        cli._cancel_kube(st.open_run(self.store, "kt"), self.api, wait_s=0)
        assert self.emu.remaining("kt") == []


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path) as c:
        yield c


def _creates(emu):
    return [n for verb, n in emu.log if verb == "create" and n.startswith("kt-") and n != "kt-run"]


def test_dag_on_trainjobs_with_a_retry_that_first_removes_the_failed_attempt(cluster):
    emu = cluster.emu
    emu.script["kt-base-1"] = ("fail", 2)
    emu.script["kt-lab-1"] = ("succeed", 3)
    cluster.driver().execute()
    assert _creates(emu) == ["kt-base-1", "kt-base-2", "kt-adapt-1", "kt-lab-1"]  # DAG order, one retry
    assert emu.log.index(("delete", "kt-base-1")) < emu.log.index(("create", "kt-base-2"))
    assert cluster.states() == {"base": ("succeeded", 2), "adapt": ("succeeded", 1), "lab": ("succeeded", 1)}
    assert emu.objects[("trainjobs", "ml", "kt-base-2")]["kind"] == "TrainJob"  # discovery chose Trainer v2
    assert "kt-base-1" not in str(emu.objects)  # its pods went with it
    cluster.cancel_and_check_clean()


def test_pytorchjob_when_trainer_is_not_installed(tmp_path):
    with Cluster(tmp_path, installed=("batch/v1", "kubeflow.org/v1")) as c:
        assert c.api.choose_job_api() == "pytorchjob"
        c.driver().execute()
        assert c.emu.objects[("pytorchjobs", "ml", "kt-base-1")]["kind"] == "PyTorchJob"
        assert c.states()["lab"] == ("succeeded", 1)
        c.cancel_and_check_clean()


def test_neither_job_api_installed_is_one_line_and_a_failed_run(tmp_path):
    with Cluster(tmp_path, installed=("batch/v1",)) as c:
        with pytest.raises(UserError, match="serves neither TrainJob .* nor PyTorchJob"):
            c.api.choose_job_api()
        c.driver().execute()
        assert c.states()["base"] == ("failed", 0)
        assert "serves neither TrainJob" in c.status()
        c.cancel_and_check_clean()


def test_an_explicit_job_api_that_is_not_served_fails_the_stage(tmp_path):
    with Cluster(tmp_path, installed=("batch/v1", "kubeflow.org/v1")) as c:
        c.driver(job_api="trainjob").execute()
        assert c.states()["base"][0] == "failed"
        assert "TrainJob (trainer.kubeflow.org/v1alpha1) is not served by this cluster" in c.status()
        c.cancel_and_check_clean()


def test_gives_up_after_retries_and_stops_downstream(cluster):
    cluster.emu.script["kt-adapt-1"] = ("fail", 1)
    cluster.emu.script["kt-adapt-2"] = ("fail", 1)
    cluster.driver().execute()
    states = {n: s for n, (s, _) in cluster.states().items()}
    assert states == {"base": "succeeded", "adapt": "failed", "lab": "pending"}
    assert "BackoffLimitExceeded" in cluster.status()
    cluster.cancel_and_check_clean()


def test_bad_input_exit_2_is_not_retried(cluster):
    cluster.emu.script["kt-adapt-1"] = ("exit:2", 1)
    cluster.driver().execute()
    assert cluster.states()["adapt"] == ("failed", 1)
    assert "kt-adapt-2" not in _creates(cluster.emu)
    assert "bad input (exit 2), not retried" in cluster.status()
    cluster.cancel_and_check_clean()


def test_bad_input_in_a_multi_node_stage_read_from_the_pods(cluster):
    cluster.emu.script["kt-base-1"] = ("exit:2", 1)  # TrainJob's condition does not say the code
    cluster.driver().execute()
    assert cluster.states()["base"] == ("failed", 1)
    cluster.cancel_and_check_clean()


def test_label_stage_waiting_for_people_then_resumed(cluster, monkeypatch):
    cluster.emu.script["kt-lab-1"] = ("exit:75", 1)
    cluster.driver().execute()  # returns: waiting for labels is final for the driver
    assert cluster.states()["lab"] == ("waiting-for-labels", 1)
    assert "unsupft-ctl resume kt" in cluster.status()
    # `resume` starts a new driver Job under the run's ConfigMap; that driver runs the stage again.
    driver = cli._resume_driver(st.open_run(cluster.store, "kt"), cluster.api, None)
    assert driver["metadata"]["name"] == "kt-driver-1"
    assert driver["metadata"]["ownerReferences"][0]["name"] == "kt-run"
    run = st.open_run(cluster.store, "kt")
    run.stages["lab"].update(state=st.PENDING, first_attempt=None)
    run.save()
    cluster.run = run
    cluster.driver().execute()
    assert cluster.states()["lab"] == ("succeeded", 2)
    cluster.cancel_and_check_clean()


def test_eviction_does_not_cost_an_attempt(cluster):
    cluster.emu.script["kt-adapt-1"] = ("evict", 3)
    cluster.driver().execute()
    assert cluster.states()["adapt"] == ("succeeded", 1)
    pods = [n for v, n in cluster.emu.log if v == "gc" and n.startswith("kt-adapt-1-")]
    assert pods == [] or set(pods) <= {"kt-adapt-1-0", "kt-adapt-1-1"}
    cluster.cancel_and_check_clean()


@pytest.mark.parametrize("outcome, shown", [
    ("imagepull", "ImagePullBackOff: Back-off pulling image"),
    ("unschedulable", "Unschedulable: 0/4 nodes are available"),
    ("quota-pods", "FailedCreate: Error creating: pods \"kt-adapt-1-0\" is forbidden: exceeded quota"),
])
def test_stuck_pending_is_shown_then_fails_after_the_timeout(cluster, outcome, shown):
    cluster.emu.script["kt-adapt-1"] = (outcome, 1)
    d = cluster.driver()
    d._setup()
    for _ in range(3):  # base succeeds, adapt is created, adapt is found stuck
        d._step()
    assert cluster.states()["adapt"] == ("running", 1)
    out = cluster.status()
    assert shown in out and "(fails after 600 s)" in out
    cluster.t = 599
    d._step()
    assert cluster.states()["adapt"][0] == "running"
    cluster.t = 600
    d._step()
    assert cluster.states()["adapt"] == ("failed", 1)
    assert f"stuck for 600 s: {shown}" in cluster.status()
    assert ("delete", "kt-adapt-1") in cluster.emu.log
    assert not d._step()  # nothing can move: the driver returns
    cluster.cancel_and_check_clean()


def test_a_stage_held_by_its_queue_waits_without_a_timeout(cluster):
    cluster.emu.script["kt-base-1"] = ("queued", 4)
    d = cluster.driver()
    d._setup()
    d._step()
    cluster.t = 10 ** 6  # far past pending_timeout_s: being queued is not being stuck
    d._step()
    assert cluster.states()["base"] == ("running", 1)
    assert "waiting: suspended until admitted (Kueue queue gpu-queue)" in cluster.status()
    d.execute()
    assert cluster.states()["base"] == ("succeeded", 1)
    assert "suspended" not in cluster.status()
    cluster.cancel_and_check_clean()


def test_quota_refusing_the_object_is_a_wait_with_a_reason(cluster):
    cluster.emu.fail_next("POST", "/jobs", 403, times=2)  # adapt's Job refused twice, then admitted
    d = cluster.driver()
    d._setup()
    d._step()
    d._step()  # base done, adapt refused
    assert cluster.states()["adapt"] == ("pending", 0)
    assert "waiting: refused by quota: jobs.batch \"x\" is forbidden: exceeded quota: gpu-quota" in cluster.status()
    d.execute()
    assert cluster.states()["adapt"] == ("succeeded", 1)
    cluster.cancel_and_check_clean()


@pytest.mark.parametrize("status", [429, 500, 503, 504, "reset"])
def test_api_hiccups_are_retried(cluster, status):
    cluster.emu.fail_next("POST", "/trainjobs", status, times=2)
    cluster.emu.fail_next("GET", "/jobs/", status, times=2)
    cluster.driver().execute()
    assert cluster.api.retried >= 2
    assert {s for s, _ in cluster.states().values()} == {"succeeded"}
    cluster.cancel_and_check_clean()


def test_api_down_beyond_the_retry_budget_is_an_infrastructure_failure(cluster):
    cluster.emu.fail_next("GET", "/namespaces/ml", 503, times=100)
    with pytest.raises(kubeapi.ApiUnavailable, match="503"):
        cluster.driver().execute()
    assert cluster.api.retried == cluster.api.retries


def test_backoff_is_capped_and_jittered(cluster):
    api = cluster.api
    delays = [api._backoff(n) for n in range(20) for _ in range(20)]
    assert max(delays) <= api.max_backoff_s and len(set(delays)) > 300


def test_uninstall_removes_everything_and_the_driver_stops(cluster):
    cluster.emu.script["kt-base-1"] = ("succeed", 10 ** 6)
    d = cluster.driver()
    d._setup()
    d._step()
    assert cluster.emu.remaining("kt")  # the TrainJob and its pod
    cluster.api.delete_configmap("ml", "kt-run")  # what `helm uninstall` does to the chart's ConfigMap
    assert cluster.emu.remaining("kt") == []  # garbage-collected through ownerReferences
    d.execute()
    assert {s for s, _ in cluster.states().values()} == {"cancelled"}
    assert "run removed (ConfigMap kt-run deleted)" in cluster.status()
    assert _creates(cluster.emu) == ["kt-base-1"]  # nothing re-created after the uninstall


def test_cancel_from_the_cli_leaves_nothing(cluster):
    cluster.emu.script["kt-base-1"] = ("succeed", 10 ** 6)
    d = cluster.driver(poll_s=0.01)
    d._setup()
    d._step()
    thread = threading.Thread(target=d.execute)
    thread.start()
    cli._cancel_kube(st.open_run(cluster.store, "kt"), cluster.api, wait_s=30, poll_s=0.01)
    thread.join(30)
    assert not thread.is_alive()
    assert {s for s, _ in cluster.states().values()} == {"cancelled"}
    assert cluster.emu.remaining("kt") == []


def test_restarted_driver_adopts_its_own_object(cluster):
    cluster.emu.script["kt-base-1"] = ("succeed", 5)
    cluster.driver()._setup()
    first = cluster.driver()
    first._setup()
    first._step()  # creates kt-base-1, then the driver "dies"
    # Worst case: a second driver that read a stale run.json (stage still pending) adopts on 409.
    cluster.run.stages["base"].update(state=st.PENDING, attempts=0)
    cluster.run = st.Run(cluster.run.uri, cluster.run.data)
    cluster.driver().execute()
    assert _creates(cluster.emu).count("kt-base-1") == 2  # the second answered 409
    assert ("trainjobs", "ml", "kt-base-2") not in cluster.emu.objects
    assert cluster.states()["base"] == ("succeeded", 1)
    cluster.cancel_and_check_clean()


def test_an_object_of_another_run_is_not_adopted(cluster):
    stranger = kube.render(cluster.pipeline, kube.Context("kt", "ml", run_uri="s3://other/runs/kt"), "img:1")[2]
    cluster.emu.add("trainjobs", "ml", stranger)
    cluster.driver().execute()
    assert cluster.states()["base"] == ("failed", 1)
    assert "TrainJob kt-base-1 already exists and belongs to s3://other/runs/kt" in cluster.status()
    assert "kt-base-1" in cluster.emu.stage_objects()  # left alone: not ours
    cluster.cancel_and_check_clean()


# ------------------------------------------------------------------------- the CLI ---

def _point_cli_at(emu: Emulator, monkeypatch) -> None:
    monkeypatch.setattr(kubeapi, "load_client", lambda: client.ApiClient(client.Configuration(host=emu.url)))


def _s3_pipeline(tmp_path, s3_store: str) -> Path:
    path = tmp_path / "kt.yaml"
    path.write_text(PIPELINE.format(store=s3_store).replace("s3://bucket/data/src", f"{s3_store}/data/src"))
    return path


def test_submit_refuses_without_the_driver_service_account(cluster, tmp_path, monkeypatch):
    _point_cli_at(cluster.emu, monkeypatch)
    path = _s3_pipeline(tmp_path, "s3://bucket/store")  # refused before the store is touched
    result = CliRunner().invoke(cli.main, ["submit", str(path), "--backend", "kubernetes", "--namespace", "ml",
                                           "--service-account", "missing"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: ServiceAccount missing not found in namespace ml; create it with "
        "`helm install unsupft-rbac charts/unsupft -n ml --set rbacOnly=true`"]
    assert _creates(cluster.emu) == []


def test_submit_with_no_job_api_is_one_line(tmp_path, monkeypatch):
    with Cluster(tmp_path, installed=("batch/v1",)) as c:
        _point_cli_at(c.emu, monkeypatch)
        path = _s3_pipeline(tmp_path, "s3://bucket/store")  # refused before the store is touched
        result = CliRunner().invoke(cli.main, ["submit", str(path), "--backend", "kubernetes", "--namespace", "ml"])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert "serves neither TrainJob" in result.output


def test_validate_checks_the_run_id(tmp_path):
    path = tmp_path / "kt.yaml"
    path.write_text(PIPELINE.format(store="s3://b/s"))
    result = CliRunner().invoke(cli.main, ["validate", str(path), "--run-id", "2024-run"])
    assert result.exit_code == 2 and "DNS-1035" in result.output


def test_submit_then_cancel_from_the_cli(tmp_path, s3_uri, monkeypatch):
    from unsupft import store

    store.write_json(f"{s3_uri}/data/src/dataset.json", {"samples": 1})
    with Cluster(tmp_path) as c:
        _point_cli_at(c.emu, monkeypatch)
        path = _s3_pipeline(tmp_path, s3_uri)
        submit = ["submit", str(path), "--backend", "kubernetes", "--namespace", "ml", "--secret", "s3-creds",
                  "--image", "reg/unsupft-driver:1"]
        taken = CliRunner().invoke(cli.main, submit + ["--run-id", "kt"])  # kt-run exists: another store's run kt
        assert taken.exit_code == 2 and "ConfigMap kt-run already exists in namespace ml" in taken.output
        c.api.delete_configmap("ml", "kt-run")
        result = CliRunner().invoke(cli.main, submit + ["--run-id", "kt2"])
        assert result.exit_code == 0, result.output
        assert "submitted run kt2: Job kt2-driver" in result.output
        configmap = c.emu.objects[("configmaps", "ml", "kt2-run")]
        driver = c.emu.objects[("jobs", "ml", "kt2-driver")]
        assert driver["metadata"]["ownerReferences"][0]["uid"] == configmap["metadata"]["uid"]
        assert "AWS_SECRET" not in str(configmap) and driver["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
            {"secretRef": {"name": "s3-creds"}}]
        run = st.open_run(s3_uri, "kt2")
        assert (run.data["job_api"], run.data["owner"], run.data["driver_image"]) == ("trainjob", "kt2-run", "reg/unsupft-driver:1")
        result = CliRunner().invoke(cli.main, ["--store", s3_uri, "cancel", "kt2", "--wait-s", "0"])
        assert result.exit_code == 0, result.output
        assert c.emu.remaining("kt2") == []  # the ConfigMap went, the driver Job with it
        status = CliRunner().invoke(cli.main, ["--store", s3_uri, "status", "kt2"]).output
        assert "cancelled (no driver answered)" in status
        resumed = CliRunner().invoke(cli.main, ["--store", s3_uri, "resume", "kt2"])  # a cancelled run continues
        assert resumed.exit_code == 0, resumed.output
        owner = c.emu.objects[("configmaps", "ml", "kt2-run")]  # made again: cancel had removed it
        assert c.emu.objects[("jobs", "ml", "kt2-driver-1")]["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
        assert {r["state"] for r in st.open_run(s3_uri, "kt2").stages.values()} == {"pending"}


def test_resume_from_the_cli_starts_a_new_driver_under_the_run(cluster, monkeypatch):
    _point_cli_at(cluster.emu, monkeypatch)
    cluster.emu.script["kt-lab-1"] = ("exit:75", 1)
    cluster.driver().execute()
    result = CliRunner().invoke(cli.main, ["--store", cluster.store, "resume", "kt"])
    assert result.exit_code == 0, result.output
    assert "resuming run kt (lab): Job kt-driver-1 in namespace ml" in result.output
    driver = cluster.emu.objects[("jobs", "ml", "kt-driver-1")]
    assert driver["metadata"]["ownerReferences"][0]["uid"] == cluster.emu.objects[("configmaps", "ml", "kt-run")]["metadata"]["uid"]
    assert driver["spec"]["template"]["spec"]["serviceAccountName"] == "unsupft-driver"
    assert driver["metadata"]["labels"][kube.QUEUE_LABEL] == "gpu-queue"  # the run's default queue, read from run.json
    cluster.run = st.open_run(cluster.store, "kt")
    assert cluster.run.stages["lab"]["state"] == "pending"
    cluster.driver().execute()  # what that driver Job does
    assert cluster.states()["lab"] == ("succeeded", 2)
    again = CliRunner().invoke(cli.main, ["--store", cluster.store, "resume", "kt"])
    assert again.exit_code == 2 and again.output.startswith("error: run kt has no stage waiting for labels, failed, cancelled or interrupted")
    cluster.cancel_and_check_clean()


def test_drive_exits_0_on_a_final_state_and_1_only_when_the_api_stays_down(cluster, monkeypatch):
    _point_cli_at(cluster.emu, monkeypatch)
    monkeypatch.setattr(kubedriver, "POLL_S", 0.0)
    cluster.emu.script["kt-adapt-1"] = ("exit:2", 1)
    result = CliRunner().invoke(cli.main, ["--store", cluster.store, "drive", "kt"])
    assert result.exit_code == 0, result.output  # a failed run is final: the driver Job must not restart
    assert "adapt: failed (bad input (exit 2)" in result.output
    run = st.open_run(cluster.store, "kt")
    run.stages["adapt"].update(state=st.PENDING, first_attempt=None)
    run.save()
    cluster.emu.fail_next("GET", "/namespaces/ml/", 503, times=100)
    result = CliRunner().invoke(cli.main, ["--store", cluster.store, "drive", "kt", "--api-retries", "1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == "error: Kubernetes API: 503 Service Unavailable after 2 tries"


TRAINER_WEBHOOK = "validate.trainjob.trainer.kubeflow.org"
RUNTIME_MISSING = 'spec.runtimeRef: Invalid value: {"name":"unsupft"}: TrainingRuntime ml/unsupft not found'
REFUSALS = {  # how each refusal reads in `status`: the API server's own Status message
    "webhook": ("base", "TrainJob kt-base-1 refused by the API server: 422 Invalid: trainjobs.trainer.kubeflow.org "
                f'"kt-base-1" is forbidden: admission webhook "{TRAINER_WEBHOOK}" denied the request: {RUNTIME_MISSING}'),
    "rbac": ("adapt", "Job kt-adapt-1 refused by the API server: 403 Forbidden: jobs.batch is forbidden: "
             f'User "{USER}" cannot create resource "jobs" in API group "batch" in the namespace "ml"'),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_a_refused_create_fails_the_stage_once_with_the_api_message(cluster, monkeypatch, refusal):
    """A webhook's 422 or RBAC's 403: one attempt, the message in `status` and the driver's log, the
    driver exits 0 (a failed run is final), the stages after it are not started."""
    if refusal == "webhook":
        cluster.emu.deny("trainjobs", TRAINER_WEBHOOK, 422, "Invalid", RUNTIME_MISSING)
    else:
        cluster.emu.forbid("create", "jobs")
    stage, shown = REFUSALS[refusal]
    _point_cli_at(cluster.emu, monkeypatch)
    monkeypatch.setattr(kubedriver, "POLL_S", 0.0)
    result = CliRunner().invoke(cli.main, ["--store", cluster.store, "drive", "kt"])
    assert result.exit_code == 0, result.output
    assert f"{stage}: failed ({shown})" in result.output
    states = cluster.states()
    assert states[stage] == ("failed", 1)  # retries: 1 in the pipeline, none spent: it would be refused again
    assert states["lab"] == ("pending", 0)
    assert _creates(cluster.emu).count(f"kt-{stage}-1") == 1 and f"kt-{stage}-2" not in _creates(cluster.emu)
    assert shown in cluster.status()
    cluster.cancel_and_check_clean()


def test_the_emulated_denial_is_the_api_servers_status():
    """The Status object the client gets, as statuserror.go's ToStatusErr builds it."""
    with Emulator() as emu:
        emu.deny("trainjobs", TRAINER_WEBHOOK, 422, "Invalid", RUNTIME_MISSING)
        emu.deny("jobs", "validation.gatekeeper.sh")  # a webhook that gives no code, reason or message
        api = kubeapi.Api(client.ApiClient(client.Configuration(host=emu.url)), sleep=lambda s: None)
        bodies = []
        for kind, name in (("TrainJob", "a"), ("Job", "b")):
            obj = {"apiVersion": "x", "kind": kind, "metadata": {"name": name, "namespace": "ml", "labels": {}}, "spec": {}}
            with pytest.raises(client.exceptions.ApiException) as caught:
                api.create(obj)
            bodies.append((caught.value.status, json.loads(caught.value.body)))
    assert bodies[0] == (422, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 422,
                               "reason": "Invalid", "details": {"name": "a", "group": "trainer.kubeflow.org", "kind": "trainjobs"},
                               "message": f'trainjobs.trainer.kubeflow.org "a" is forbidden: admission webhook '
                                          f'"{TRAINER_WEBHOOK}" denied the request: {RUNTIME_MISSING}'})
    assert bodies[1][0] == 403 and bodies[1][1]["reason"] == "Forbidden"
    assert bodies[1][1]["message"] == 'jobs.batch "b" is forbidden: admission webhook "validation.gatekeeper.sh" denied the request without explanation'


def _delete_as_an_admin(cluster, name: str) -> None:
    """`kubectl delete trainjob NAME`: background propagation, not through the driver."""
    cluster.api.custom.delete_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", name,
                                                       propagation_policy="Background")


def test_a_stage_object_deleted_by_someone_else_is_a_failed_attempt(cluster):
    log: list[str] = []
    for name in ("kt-base-1", "kt-base-2"):
        cluster.emu.script[name] = ("succeed", 10 ** 6)
    d = cluster.driver(echo=log.append)
    d._setup()
    d._step()
    _delete_as_an_admin(cluster, "kt-base-1")
    d._step()  # attempt 1 is a failure (retries: 1 left one more)
    assert "base: attempt 1 failed (deleted by someone else: TrainJob kt-base-1 is gone); retrying" in log
    d._step()
    assert cluster.states()["base"] == ("running", 2) and "kt-base-2" in cluster.emu.stage_objects()
    _delete_as_an_admin(cluster, "kt-base-2")
    d.execute()  # no attempt left: the stage fails with the reason, nothing after it starts
    assert cluster.states() == {"base": ("failed", 2), "adapt": ("pending", 0), "lab": ("pending", 0)}
    assert "deleted by someone else: TrainJob kt-base-2 is gone" in cluster.status()
    assert _creates(cluster.emu) == ["kt-base-1", "kt-base-2"]  # never recreated under the same name
    cluster.cancel_and_check_clean()


def test_a_driver_that_died_before_creating_still_creates_its_attempt(cluster):
    d = cluster.driver()
    d._setup()
    cluster.run.set("base", state=st.RUNNING, attempts=1, created=False)  # intent recorded, then the driver died
    d.execute()
    assert cluster.states()["base"] == ("succeeded", 1) and _creates(cluster.emu)[0] == "kt-base-1"
    cluster.cancel_and_check_clean()


def test_a_run_held_by_another_live_driver_exits_73_not_retried(cluster, monkeypatch):
    """The driver Job's podFailurePolicy fails the Job on 73 (tests/test_ctl_kube.py checks the rule)."""
    _point_cli_at(cluster.emu, monkeypatch)
    held = lease.acquire(f"{cluster.run.uri}/{lease.LEASE}", "unsupft-ctl", "run kt")  # this live process holds it
    try:
        result = CliRunner().invoke(cli.main, ["--store", cluster.store, "drive", "kt"])
    finally:
        held.release()
    assert result.exit_code == kube.EXIT_DRIVER_HELD == 73
    assert result.output.strip().splitlines()[-1].startswith("error: run kt is in use by unsupft-ctl")
    assert _creates(cluster.emu) == []
