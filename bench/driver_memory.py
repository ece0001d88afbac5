"""Peak memory (max RSS) of the in-cluster driver, `unsupft-ctl drive RUN`, over a whole run.

The driver runs as a real process against the API emulator of the tests (tests/kube_emulator.py,
through the official client, over HTTP), on a three-stage pipeline with a multi-node TrainJob,
until the run succeeds; its max RSS is read from wait4(). Four ways it can run:

- `submit`'s driver (the run exists: `drive RUN`) and the chart's (`drive RUN --create-from FILE`),
- each with this full install, and as in images/driver.Dockerfile (tests/driver_image.py: the
  training libraries cannot be imported).

    PYTHONPATH=. python bench/driver_memory.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import client

from tests.kube_emulator import Emulator
from unsupft import stage as stage_contract
from unsupft import store
from unsupft.ctl import kube, kubeapi, spec
from unsupft.ctl import state as st

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = """\
name: mem
store: file://{tmp}/store
datasets: {{src: file://{tmp}/data/src}}
stages:
  base: {{kind: pretrain, data: [src], arch: resnet50, steps: 100}}
  adapt: {{kind: adapt, init: base, target: src, mix: cutmix}}
  probe: {{kind: evaluate, model: {{adapt: adapt}}, train: src, test: src}}
resources:
  defaults: {{image: "registry.example/unsupft:0.1", cpu: 4, memory: 16Gi}}
  base: {{gpus: 8, nodes: 2, procs_per_node: 8}}
"""


def _measure(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, exit code) of one driver process.

    The peak is the kernel's high-water mark of the process's own address space (VmHWM, read
    until it exits); wait4's ru_maxrss would also count the bench's memory at fork time."""
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_kib = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kib = max(peak_kib, int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]))
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    return peak_kib / 1024, time.time() - t0, proc.returncode


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store.write_json(f"file://{tmp}/data/src/dataset.json", {"samples": 1})
        pipeline_file = Path(tmp) / "mem.yaml"
        pipeline_file.write_text(PIPELINE.format(tmp=tmp))
        store_uri = f"file://{tmp}/store"

        def finished(obj):
            name = obj["metadata"]["labels"][kube.LABEL_STAGE]
            run_id = obj["metadata"]["labels"][kube.LABEL_RUN]
            stage_contract.write_done(store.join(st.run_uri(store_uri, run_id), name), name, {"s": name}, {}, [], 0.0)

        with Emulator(on_success=finished) as emu:
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(f"apiVersion: v1\nkind: Config\nclusters: [{{name: e, cluster: {{server: '{emu.url}'}}}}]\n"
                                  "users: [{name: u, user: {token: t}}]\ncontexts: [{name: e, context: {cluster: e, user: u}}]\n"
                                  "current-context: e\n")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "KUBECONFIG": str(kubeconfig)}
            env.pop("KUBERNETES_SERVICE_HOST", None)
            api = kubeapi.Api(client.ApiClient(client.Configuration(host=emu.url)))
            pipeline = spec.load(pipeline_file)
            for image, program in (("full install", ["-m", "unsupft.ctl"]), ("driver image", ["-m", "tests.driver_image"])):
                for how in ("submit", "chart"):
                    run_id = f"{'f' if image == 'full install' else 'd'}-{how}"
                    ctx = kube.Context(run_id, "ml", run_uri=st.run_uri(store_uri, run_id))
                    api.create(kube.run_configmap(ctx, store_uri))
                    args = ["--store", store_uri, "drive", run_id]
                    if how == "submit":
                        st.create(pipeline, run_id, "kubernetes", namespace="ml", owner=kube.object_name(run_id, "run"))
                    else:
                        args += ["--create-from", str(pipeline_file), "--namespace", "ml",
                                 "--owner-configmap", kube.object_name(run_id, "run")]
                    rss, secs, code = _measure([sys.executable, *program, *args], env)
                    states = {n: r["state"] for n, r in st.open_run(store_uri, run_id).stages.items()}
                    results[f"{image}, {how}"] = {"max_rss_mib": round(rss, 1), "seconds": round(secs, 1),
                                                  "exit": code, "states": sorted(set(states.values()))}
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores", "python": platform.python_version(),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
