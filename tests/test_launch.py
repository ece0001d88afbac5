"""A multi-process stage's container exits with the stage's own code (issue 23, item 1).

The commands are the ones `unsupft.ctl.kube` renders for a pipeline (TrainJob `trainer.command`,
PyTorchJob Master container), run by hand as real processes with the environment the operators
inject, on loopback (CPU, Gloo), no emulator:
- TrainJob: the Trainer v2.3.0 torch plugin's PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
  PET_MASTER_ADDR, PET_MASTER_PORT (kubeflow/trainer pkg/runtime/framework/plugins/torch/torch.go,
  `EnforceMLPolicy`) plus the rendered `trainer.env`;
- PyTorchJob: the training operator v1.9.0's `setPodEnv` for Master 0 (kubeflow/training-operator
  pkg/controller.v1/pytorch/envvar.go and master.go): the same PET_* and also MASTER_ADDR,
  MASTER_PORT, WORLD_SIZE, RANK, plus the container's own env.
torchrun itself exits 1 for a worker's 2, so the bad-input tests fail on the old `torchrun -m unsupft`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.seaweedfs import _free_ports
from tests.test_bad_inputs import _tar
from tests.test_selfsup_stages import ENV
from unsupft import checkpoint
from unsupft.cli import main as unsupft_main
from unsupft.ctl import kube, spec
from unsupft.distributed import stage_exit_code

PIPELINE = """\
name: lt
store: file://{store}
datasets: {{data: {data}}}
stages:
  base: {{kind: pretrain, data: [data], arch: tiny, steps: 2, batch_size: 16, queue_size: 32, workers: 0}}
resources:
  base: {{nodes: 1, procs_per_node: 2}}
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 digits, enough for 2 steps of 16 on 2 ranks (ingested in-process: no interpreter start)."""
    root = tmp_path_factory.mktemp("digits") / "data"
    result = CliRunner().invoke(unsupft_main, ["ingest", "sklearn:digits", str(root), "--limit", "64"])
    assert result.exit_code == 0, result.output
    return root


def _rendered(job_api: str, store: Path, data: str) -> tuple[list[str], dict[str, str]]:
    """The stage object's command and the pod environment its operator gives node/Master 0."""
    pipeline = spec.parse(PIPELINE.format(store=store, data=data), "lt.yaml")
    objs = kube.render(pipeline, kube.Context("lt", "ml", job_api=job_api), "img:1")
    job = next(o for o in objs if o["kind"] in ("TrainJob", "PyTorchJob"))
    (port,) = _free_ports(1)
    pet = {"PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    if job_api == "trainjob":
        trainer = job["spec"]["trainer"]
        env = {e["name"]: e["value"] for e in trainer["env"]}
        pet |= {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"])}
        return trainer["command"], {**env, **pet}
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in master["env"]}
    nproc = job["spec"]["nprocPerNode"]
    pet |= {"PET_NNODES": "1", "PET_NPROC_PER_NODE": nproc, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": nproc, "RANK": "0"}
    return master["command"], {**env, **pet}


def _run_in_pod(command: list[str], pod_env: dict[str, str]) -> subprocess.CompletedProcess:
    """The container command as the pod runs it: this venv stands in for the image (its bin first on PATH)."""
    env = {**ENV, **pod_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CUDA_VISIBLE_DEVICES": ""}  # Gloo on the CPU, also where a GPU is visible
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("job_api", ["trainjob", "pytorchjob"])
def test_bad_input_in_a_two_process_stage_exits_2_with_its_error_line(job_api, tmp_path):
    (tmp_path / "f.tar").write_bytes(_tar({"a.txt": b"caption", "a.cls": b"0"}))
    command, pod_env = _rendered(job_api, tmp_path / "store", str(tmp_path / "f.tar"))
    proc = _run_in_pod(command, pod_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = {line for line in output.splitlines() if line.startswith("error: ")}  # each rank prints it
    assert len(errors) == 1 and "image member" in errors.pop(), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (tmp_path / "store").exists()  # nothing written on exit 2


@pytest.mark.parametrize("job_api", ["trainjob", "pytorchjob"])
def test_good_input_in_a_two_process_stage_exits_0_and_finishes(job_api, digits, tmp_path):
    command, pod_env = _rendered(job_api, tmp_path / "store", str(digits))
    proc = _run_in_pod(command, pod_env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = tmp_path / "store" / "runs" / "lt" / "base"
    assert (out / "_DONE.json").exists()
    assert checkpoint.load(str(out / "checkpoint.pt"))["world_size"] == 2  # one group of the two processes


@pytest.mark.parametrize("codes, expected", [
    ([-15, 2], 2),       # the reproduction: rank 1 exits 2, the agent SIGTERMs rank 0 (recorded too)
    ([1, 2, -15], 2),    # a peer's broken collective does not hide bad input
    ([69, 75], 75),      # waiting for labels is a deliberate stop: over infrastructure
    ([2, 75], 2),        # bad input over waiting: a retry meets it again
    ([1, 69, -15], 69),  # the store failed on one rank; its peers crashed as a consequence
    ([-15, 1], 1),       # a bug; the survivor the agent stopped is not the cause
    ([3, 1], 3),         # any other code of the program's own, the first recorded
    ([-9, -15], 137),    # killed from outside (OOM: SIGKILL) before the agent stopped the rest
])
def test_the_stage_code_chosen_across_ranks(codes, expected):
    assert stage_exit_code(codes) == expected
