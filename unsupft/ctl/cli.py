"""`unsupft-ctl`: validate, run, submit and inspect pipelines.

`run FILE` is the everyday command: it runs the pipeline here, stage after stage, and a second
`run` of the same file continues where the first stopped (finished stages are cached). `submit`
starts a run that must be new (the run id is taken with a conditional write), locally in the
background or on Kubernetes through a driver Job. `status`, `logs`, `fetch` and `cancel` read the
run state from the store, so they work from any machine that can reach it.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

from unsupft import __version__, store
from unsupft.ctl import spec as spec_mod
from unsupft.ctl import state as st
from unsupft.ctl.command import check_options
from unsupft.errors import OneLineGroup, UserError, report_user_errors
from unsupft.lease import LeaseHeld
from unsupft.stage import DATASET_MANIFEST

DEFAULT_STORE = "file://./runs"


def _load(file: str, store_override: str | None) -> spec_mod.Pipeline:
    pipeline = spec_mod.load(file)
    check_options(pipeline, file)
    return dataclasses.replace(pipeline, store=store.normalize(store_override)) if store_override else pipeline


def _preflight(pipeline: spec_mod.Pipeline) -> None:
    """Fail before any stage starts: the store must answer and every data set must be there.

    A data set is what the stages' data options read (README, "Data options"): an unsupft data set
    (a folder or prefix with `dataset.json`), a `.tar`, a folder or prefix of tars written by other
    tools, or a brace pattern. A brace pattern is left to the stage that reads it, which checks
    that every shard it names exists (the controller does not expand patterns); the stages also
    verify what the shards hold."""
    store.exists(store.join(pipeline.store, "runs"))  # raises UserError naming the URI when unreachable
    for name, uri in pipeline.datasets.items():
        if "{" in uri:
            continue
        if uri.endswith(".tar"):
            if not store.exists(uri):
                raise UserError(f"datasets.{name}: {uri}: no such shard")
        elif not store.exists(store.join(uri, DATASET_MANIFEST)) and not any(
                n.endswith(".tar") for n in store.list_prefix(uri)):
            raise UserError(f"datasets.{name}: {uri}: not a data set (no {DATASET_MANIFEST} and no .tar shards); "
                            "run `unsupft ingest` first")


def _recorded(run_: st.Run, store_uri: str | None) -> spec_mod.Pipeline:
    """The pipeline as the run recorded it in run.json (in `store_uri` when given)."""
    pipeline = spec_mod.parse(yaml.safe_dump(run_.data["spec"]), f"{run_.uri}/run.json")
    return dataclasses.replace(pipeline, store=store_uri) if store_uri else pipeline


def _store(ctx: click.Context) -> str:
    return store.normalize(ctx.obj.get("store") or DEFAULT_STORE)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unsupft-ctl")
@click.option("--store", envvar="UNSUPFT_STORE", default=None,
              help="Store URI holding runs (default: the pipeline's `store`, else file://./runs).")
@click.pass_context
def main(ctx: click.Context, store: str | None) -> None:
    """Run unsupft pipelines locally or on Kubernetes."""
    ctx.ensure_object(dict)["store"] = store


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--run-id", default=None, help="Also check this run id (default: the pipeline's name).")
@click.pass_context
@report_user_errors
def validate(ctx: click.Context, file: str, run_id: str | None) -> None:
    """Check a pipeline file (fields, types, references, cycles) without running anything."""
    pipeline = _load(file, ctx.obj["store"])
    _run_id(run_id, pipeline)
    chain = ", ".join(f"{n} ({s.kind})" for n, s in pipeline.stages.items())
    click.echo(f"ok: {pipeline.name}: {len(pipeline.stages)} stages in order: {chain}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--run-id", default=None, help="Run id (default: the pipeline's name).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="Independent stages run at the same time (default: one per two CPU cores, at most 4).")
@click.pass_context
@report_user_errors
def run(ctx: click.Context, file: str, run_id: str | None, max_parallel: int | None) -> None:
    """Run a pipeline here and wait; running it again continues where it stopped.

    Exits 0 when every stage succeeded, 1 when one did not, 2 on bad input. Stopped by SIGTERM or
    SIGINT, it stops its running stages first, records them as interrupted and exits 143 (SIGTERM)
    or 130 (SIGINT); running it again resumes them.
    """
    pipeline = _load(file, ctx.obj["store"])
    run_id = _run_id(run_id, pipeline)
    _preflight(pipeline)
    run_ = st.create(pipeline, run_id, "local")
    created = run_ is not None
    run_ = run_ or st.open_run(pipeline.store, run_id)
    if run_.data["backend"] != "local":
        raise UserError(f"run {run_id} was submitted to {run_.data['backend']}; use a new --run-id")
    st.take(run_)  # one controller per run: a second `run` of the same id stops here with one line
    if not created:
        store.delete(store.join(run_.uri, st.CANCEL_FILE))
        st.refresh(run_, pipeline)
        click.echo(f"continuing run {run_id} in {run_.uri}")
    else:
        click.echo(f"run {run_id} in {run_.uri}")
    sys.exit(_drive_local(run_, pipeline, max_parallel))


def _run_id(run_id: str | None, pipeline: spec_mod.Pipeline) -> str:
    run_id = run_id or pipeline.name
    if not spec_mod.RUN_ID_RE.match(run_id):
        raise UserError(f"--run-id {run_id!r}: {spec_mod.RUN_ID_RULE}")
    return run_id


def _drive_local(run_: st.Run, pipeline: spec_mod.Pipeline, max_parallel: int | None = None) -> int:
    """Run the stages here and print the table; the exit status: 0 when every stage succeeded."""
    from unsupft.ctl.local import LocalBackend

    ok = LocalBackend(run_, pipeline, max_parallel=max_parallel, echo=click.echo).execute()
    _print_table(st.open_run(pipeline.store, run_.run_id))
    return 0 if ok else 1


def _print_table(run_: st.Run) -> None:
    rows = [("STAGE", "KIND", "STATE", "TRIES", "SECONDS", "OUTPUT / MESSAGE")]
    for name in run_.data["order"]:
        rec = run_.stages[name]
        secs = f"{rec['finished'] - rec['started']:.1f}" if rec.get("started") and rec.get("finished") else "-"
        note = rec.get("message") or (run_.stage_uri(name) if rec["state"] == st.SUCCEEDED else "")
        rows.append((name, rec["kind"], rec["state"], str(rec["attempts"]), secs, note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    for name in run_.data["order"]:  # where to look next: the evaluate stages' reports
        json_uri = store.join(run_.stage_uri(name), "report.json")
        if run_.stages[name]["state"] != st.SUCCEEDED or not store.exists(json_uri):
            continue
        click.echo("")
        click.echo(_results_table(store.read_json(json_uri)))
        click.echo(f"report ({name}): {store.join(run_.stage_uri(name), 'report.html')}")


def _results_table(report: dict) -> str:
    """The evaluate report's headline numbers, one row per model, for the end of a run."""
    models = report.get("models", {})
    shots = sorted({k for m in models.values() for k in m.get("fewshot", {})}, key=int)
    scalars = [k for k in ("retrieval_top5", "cluster_bcubed_f", "linear_top1", "sdbw")
               if any(k in m for m in models.values())]
    own = any("classifier" in m for m in models.values())
    header = ["MODEL"] + ["OWN TOP1"] * own + [f"{k}-SHOT TOP1" for k in shots] + [k.upper() for k in scalars]
    rows = [header]
    for name, m in models.items():
        classifier = [f"{m['classifier']['top1']:.3f}" if "classifier" in m else "-"] * own
        fewshot = [f"{m['fewshot'][k]['top1_mean']:.3f}" if k in m.get("fewshot", {}) else "-" for k in shots]
        rows.append([name] + classifier + fewshot + [f"{m[k]:.3f}" if k in m else "-" for k in scalars])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


JOB_API = click.Choice(spec_mod.JOB_APIS)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["local", "kubernetes"]), default="local", show_default=True)
@click.option("--namespace", default="default", show_default=True, help="Kubernetes namespace.")
@click.option("--run-id", default=None, help="Run id (default: the pipeline's name); must be new.")
@click.option("--image", default=None, help="Driver image (default: the pipeline's default stage image).")
@click.option("--secret", default=None, help="Secret with the store credentials (AWS_ACCESS_KEY_ID, ...), by name.")
@click.option("--service-account", default="unsupft-driver", show_default=True,
              help="The driver's ServiceAccount (the chart's RBAC-only install creates it).")
@click.option("--job-api", type=JOB_API, default="auto", show_default=True,
              help="Multi-process stages as TrainJob or PyTorchJob; auto asks the cluster (overrides the pipeline).")
@click.option("--wait", is_flag=True, help="Wait for the run to finish and print the table.")
@click.pass_context
@report_user_errors
def submit(ctx, file, backend, namespace, run_id, image, secret, service_account, job_api, wait) -> None:
    """Start a new run in the background (here) or on Kubernetes; a used run id is refused."""
    pipeline = _load(file, ctx.obj["store"])
    run_id = _run_id(run_id, pipeline)
    extra: dict = {}
    if backend == "kubernetes":
        from unsupft.ctl import kube, kubeapi

        kube.check_store_for_cluster(pipeline)
        api = kubeapi.Api()
        if not api.service_account_exists(namespace, service_account):
            raise UserError(f"ServiceAccount {service_account} not found in namespace {namespace}; create it with "
                            f"`helm install unsupft-rbac charts/unsupft -n {namespace} --set rbacOnly=true`")
        chosen = _job_api(api, pipeline, job_api)
        image = image or next(iter(pipeline.stages.values())).resources.image
        extra = {"namespace": namespace, "secret": secret, "job_api": chosen, "owner": kube.object_name(run_id, "run"),
                 "owner_created_by": "submit", "service_account": service_account, "driver_image": image}
    _preflight(pipeline)
    run_ = st.create(pipeline, run_id, backend, **extra)
    if run_ is None:
        raise UserError(f"run {run_id} already exists in {st.run_uri(pipeline.store, run_id)}; pick another --run-id")
    if backend == "kubernetes":
        from kubernetes.client.exceptions import ApiException

        kctx = kube.Context(run_id, namespace, secret, kube.store_env(), run_.uri)
        try:
            configmap = api.create(kube.run_configmap(kctx, pipeline.store))
        except ApiException as exc:
            if exc.status != 409:
                raise
            raise UserError(f"ConfigMap {extra['owner']} already exists in namespace {namespace} (a run with this id from "
                            "another store?); delete it or pick another --run-id") from None
        kctx.owner = kube.owner_reference(configmap)
        driver = kube.driver_job(kctx, pipeline.store, image, service_account=service_account,
                                 queue=kube.default_queue(pipeline.source))
        api.create(driver)
        click.echo(f"submitted run {run_id}: Job {driver['metadata']['name']} in namespace {namespace}")
    elif wait:
        st.take(run_)
        sys.exit(_drive_local(run_, pipeline))
    else:
        log = store.local_path(store.join(run_.uri, st.LOGS, "controller.log"))
        if log is None:
            raise UserError("a background local run needs a local store; use --wait or `unsupft-ctl run`")
        log.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "unsupft.ctl", "--store", pipeline.store, "drive", run_id]
        with open(log, "ab") as out:
            subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        click.echo(f"submitted run {run_id} in {run_.uri} (controller log: {log})")
    if wait:
        sys.exit(_wait(pipeline.store, run_id))


def _job_api(api, pipeline: spec_mod.Pipeline, job_api: str) -> str | None:
    """The job API multi-process stages use: the flag, else the cluster's (None: no such stage)."""
    from unsupft.ctl import kube

    if not any(s.resources.processes > 1 for s in pipeline.stages.values()):
        return None if job_api == "auto" else job_api
    if job_api == "auto":
        return api.choose_job_api()
    kind = kube.JOB_KINDS[job_api]
    if not api.served(kind):
        raise UserError(f"--job-api {job_api}: this cluster does not serve {kind.kind} ({kind.api_version})")
    return job_api


def _wait(store_uri: str, run_id: str, poll_s: float = 10.0) -> int:
    seen: dict[str, str] = {}
    while True:
        run_ = st.open_run(store_uri, run_id)
        for name, rec in run_.stages.items():
            if seen.get(name) != rec["state"]:
                seen[name] = rec["state"]
                click.echo(f"{name:<16} {rec['state']}")
        states = {r["state"] for r in run_.stages.values()}
        # over once nothing runs and nothing more will start: nothing pending, or a stage failed or was cancelled
        if st.RUNNING not in states and (st.PENDING not in states or states & {st.FAILED, st.CANCELLED}):
            _print_table(run_)
            return 0 if states == {st.SUCCEEDED} else 1
        time.sleep(poll_s)


@main.command()
@click.argument("run_id")
@click.option("--create-from", type=click.Path(dir_okay=False), default=None,
              help="Pipeline file: create the (Kubernetes) run first if it does not exist (the Helm chart's driver).")
@click.option("--namespace", default="default", show_default=True, help="With --create-from: the namespace.")
@click.option("--secret", default=None, help="With --create-from: Secret with the store credentials, by name.")
@click.option("--owner-configmap", default=None, help="With --create-from: the ConfigMap that owns the run's objects.")
@click.option("--service-account", default=None, help="With --create-from: this driver's ServiceAccount (for resume).")
@click.option("--image", default=None, help="With --create-from: this driver's image (for resume).")
@click.option("--job-api", type=JOB_API, default="auto", show_default=True,
              help="With --create-from: multi-process stages as TrainJob or PyTorchJob; auto asks the cluster.")
@click.option("--api-retries", type=click.IntRange(min=0), default=8, show_default=True,
              help="Kubernetes: retries of one API call on 429, 5xx or a dropped connection (backoff 0.5 s doubling to 30 s, jittered).")
@click.pass_context
@report_user_errors
def drive(ctx: click.Context, run_id: str, create_from: str | None, namespace: str, secret: str | None,
          owner_configmap: str | None, service_account: str | None, image: str | None, job_api: str,
          api_retries: int) -> None:
    """Drive an existing run to its end (what `submit` starts; in the cluster, the driver Job).

    On Kubernetes it exits 0 whenever the run is final (succeeded, failed, cancelled, waiting for
    labels), 1 only when the API server stayed unreachable through every retry, and 73 when another
    live driver holds the run (its Job's podFailurePolicy then fails it instead of retrying).
    """
    if create_from:
        pipeline = _load(create_from, ctx.obj["store"])
        _preflight(pipeline)
        # A restarted driver pod finds the run already there (create answers None) and continues it.
        st.create(pipeline, _run_id(run_id, pipeline), "kubernetes", namespace=namespace, secret=secret,
                  owner=owner_configmap, service_account=service_account, driver_image=image,
                  job_api=None if job_api == "auto" else job_api)
        ctx.obj["store"] = pipeline.store
    run_ = st.open_run(_store(ctx), run_id)
    try:
        st.take(run_)  # a restarted driver takes over once its predecessor's lease has expired
    except LeaseHeld as exc:
        if run_.data["backend"] != "kubernetes":
            raise
        from unsupft.ctl.kube import EXIT_DRIVER_HELD

        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_DRIVER_HELD)
    pipeline = _recorded(run_, _store(ctx) if ctx.obj.get("store") else None)
    if run_.data["backend"] == "local":
        sys.exit(_drive_local(run_, pipeline))
    from unsupft.ctl import kube, kubeapi, kubedriver

    kctx = kube.Context(run_id, run_.data["namespace"], run_.data.get("secret"), kube.store_env(), run_.uri)
    try:
        kubedriver.Driver(run_, pipeline, kubeapi.Api(retries=api_retries), kctx, echo=click.echo).execute()
    except kubeapi.ApiUnavailable as exc:  # the Job's backoffLimit starts a new driver, which adopts
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    _print_table(st.open_run(pipeline.store, run_id))


@main.command()
@click.argument("run_id")
@click.pass_context
@report_user_errors
def status(ctx: click.Context, run_id: str) -> None:
    """Table of the run's stages: state, attempts, time, output."""
    run_ = st.open_run(_store(ctx), run_id)
    click.echo(f"run {run_id} ({run_.data['pipeline']}, {run_.data['backend']}) in {run_.uri}")
    _print_table(run_)


@main.command()
@click.argument("run_id")
@click.argument("stage")
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the stage runs.")
@click.option("--attempt", type=int, default=None, help="Attempt number (default: the latest).")
@click.pass_context
@report_user_errors
def logs(ctx: click.Context, run_id: str, stage: str, follow: bool, attempt: int | None) -> None:
    """Print a stage's log (local runs: from the store; Kubernetes runs: from the stage's pod)."""
    run_ = st.open_run(_store(ctx), run_id)
    if stage not in run_.stages:
        raise UserError(f"run {run_id} has no stage {stage!r} (stages: {', '.join(run_.stages)})")
    if run_.data["backend"] == "kubernetes":
        from unsupft.ctl import kubeapi

        click.echo(kubeapi.Api().stage_logs(run_.data["namespace"], run_id, stage), nl=False)
        return
    shown = 0
    while True:
        run_ = st.open_run(_store(ctx), run_id)
        rec = run_.stages[stage]
        uri = run_.log_uri(stage, attempt)
        if rec["attempts"] == 0:
            if not follow:
                raise UserError(f"stage {stage} of run {run_id} has not started yet")
        elif store.exists(uri):
            data = store.read_bytes(uri)
            sys.stdout.buffer.write(data[shown:])
            sys.stdout.flush()
            shown = len(data)
        if not follow or rec["state"] not in (st.RUNNING, st.PENDING):
            return
        time.sleep(1.0)


@main.command()
@click.argument("run_id")
@click.argument("stage", required=False)
@click.option("--to", "dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Local folder; files land in DEST/<run>/<stage>/.")
@click.pass_context
@report_user_errors
def fetch(ctx: click.Context, run_id: str, stage: str | None, dest: str) -> None:
    """Download a run's artifacts (models, reports, metrics) from the store."""
    run_ = st.open_run(_store(ctx), run_id)
    stages = [stage] if stage else list(run_.stages)
    for name in stages:
        if name not in run_.stages:
            raise UserError(f"run {run_id} has no stage {name!r} (stages: {', '.join(run_.stages)})")
        target = Path(dest) / run_id / name
        names = store.list_prefix(run_.stage_uri(name))
        for rel in names:
            store.download_file(store.join(run_.stage_uri(name), rel), target / rel)
        click.echo(f"{name}: {len(names)} files -> {target}")


@main.command()
@click.argument("run_id")
@click.option("--wait-s", type=click.IntRange(min=0), default=60, show_default=True,
              help="Kubernetes: how long to wait for the driver to record the cancel.")
@click.pass_context
@report_user_errors
def cancel(ctx: click.Context, run_id: str, wait_s: int) -> None:
    """Stop a run: running stages are killed (local) or their objects deleted (Kubernetes)."""
    run_ = st.open_run(_store(ctx), run_id)
    if run_.data["backend"] == "kubernetes":
        from unsupft.ctl import kubeapi

        _cancel_kube(run_, kubeapi.Api(), wait_s)
    else:
        from unsupft.ctl.local import cancel_local

        cancel_local(run_)
    click.echo(f"cancelled run {run_id}")


def _cancel_kube(run_: st.Run, api, wait_s: float, poll_s: float = 1.0) -> None:
    """Mark the run, delete its stage objects, let the driver record it (or record it here when no
    driver answers), then delete the run's ConfigMap when `submit` made it: the garbage collector
    removes the driver Job with it, so nothing of the run is left in the namespace."""
    namespace = run_.data["namespace"]
    run_.request_cancel()
    api.delete_stages(namespace, run_.run_id)
    deadline = time.time() + wait_s
    while any(r["state"] in (st.RUNNING, st.PENDING) for r in run_.stages.values()):
        if time.time() >= deadline:
            for rec in run_.stages.values():
                if rec["state"] in (st.RUNNING, st.PENDING):
                    rec.update(state=st.CANCELLED, finished=time.time(), message="cancelled (no driver answered)")
            run_.save()
            break
        time.sleep(poll_s)
        run_ = st.open_run(run_.data["store"], run_.run_id)
    if run_.data.get("owner_created_by") == "submit":
        api.delete_configmap(namespace, run_.data["owner"])


@main.command()
@click.argument("run_id")
@click.option("--image", default=None, help="Kubernetes: the driver image (default: the one that ran it).")
@click.option("--wait", is_flag=True, help="Kubernetes: wait for the run to finish and print the table.")
@click.pass_context
@report_user_errors
def resume(ctx: click.Context, run_id: str, image: str | None, wait: bool) -> None:
    """Continue a run whose stages wait for labels, failed (after fixing the cause), were cancelled or interrupted."""
    run_ = st.open_run(_store(ctx), run_id)
    again = [n for n, r in run_.stages.items() if r["state"] in (st.WAITING, st.FAILED, st.CANCELLED, st.INTERRUPTED)]
    if not again:
        states = ", ".join(f"{n} {r['state']}" for n, r in run_.stages.items())
        raise UserError(f"run {run_id} has no stage waiting for labels, failed, cancelled or interrupted ({states})")
    if run_.data["backend"] == "local" and st.controller_alive(run_):
        raise UserError(f"run {run_id} is being run by process {run_.data['controller']['pid']}")
    if run_.data["backend"] == "local":
        st.take(run_)  # before the state changes: a second `resume` of the same run stops here
    store.delete(store.join(run_.uri, st.CANCEL_FILE))
    for name in again:  # a fresh retry budget; attempts keep counting so object names stay unique
        run_.stages[name].update(state=st.PENDING, first_attempt=None, message="resumed")
    run_.save()
    if run_.data["backend"] == "local":
        click.echo(f"resuming run {run_id}: {', '.join(again)}")
        sys.exit(_drive_local(run_, _recorded(run_, run_.data["store"])))
    from unsupft.ctl import kubeapi

    api = kubeapi.Api()
    driver = _resume_driver(run_, api, image)
    click.echo(f"resuming run {run_id} ({', '.join(again)}): Job {driver['metadata']['name']} in namespace {run_.data['namespace']}")
    if wait:
        sys.exit(_wait(run_.data["store"], run_id))


def _resume_driver(run_: st.Run, api, image: str | None) -> dict:
    """A new driver Job (`<run>-driver-<n>`) under the run's ConfigMap; the old one has finished."""
    from unsupft.ctl import kube

    namespace = run_.data["namespace"]
    kctx = kube.Context(run_.run_id, namespace, run_.data.get("secret"), kube.store_env(), run_.uri)
    if run_.data.get("owner"):
        configmap = api.configmap(namespace, run_.data["owner"])
        if configmap is None and run_.data.get("owner_created_by") == "submit":  # `cancel` removed it
            configmap = api.create(kube.run_configmap(kctx, run_.data["store"]))
        elif configmap is None:
            raise UserError(f"run {run_.run_id} was removed from namespace {namespace} (ConfigMap {run_.data['owner']} "
                            "is gone: the chart release was uninstalled); install it again to continue")
        kctx.owner = kube.owner_reference(configmap)
    image = image or run_.data.get("driver_image")
    if not image:
        raise UserError(f"run {run_.run_id} does not record its driver image; pass --image")
    generation = run_.data.get("generation", 0) + 1
    run_.data["generation"] = generation
    run_.save()
    driver = kube.driver_job(kctx, run_.data["store"], image, generation=generation,
                             service_account=run_.data.get("service_account") or "unsupft-driver",
                             queue=kube.default_queue(run_.data.get("spec") or {}))
    api.create(driver)
    return driver


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--namespace", default="default", show_default=True)
@click.option("--run-id", default=None)
@click.option("--image", default=None, help="Driver image (default: the pipeline's default stage image).")
@click.option("--secret", default=None, help="Secret with the store credentials, by name.")
@click.option("--job-api", type=click.Choice(spec_mod.JOB_APIS[1:]), default="trainjob", show_default=True,
              help="Multi-process stages whose pipeline says auto: TrainJob or PyTorchJob.")
@click.pass_context
@report_user_errors
def render(ctx, file, namespace, run_id, image, secret, job_api) -> None:
    """Print the Kubernetes objects a submit would create (run ConfigMap, driver Job, each stage's first attempt)."""
    from unsupft.ctl import kube

    pipeline = _load(file, ctx.obj["store"])
    run_id = _run_id(run_id, pipeline)
    kctx = kube.Context(run_id, namespace, secret, kube.store_env(), job_api=job_api)
    objs = kube.render(pipeline, kctx, image or next(iter(pipeline.stages.values())).resources.image)
    click.echo(yaml.safe_dump_all(objs, sort_keys=False), nl=False)
