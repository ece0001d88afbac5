"""`unsupft-ctl resume RUN` on the local backend: a failed stage runs again (after its cause was
fixed) with a fresh retry budget, and the rest of the run follows. (Kubernetes: test_ctl_kube_driver.)"""

from __future__ import annotations

from tests.test_ctl_local import _ctl, _pipeline, _runs, _state


def test_resume_a_failed_local_run(tmp_path):
    f = _pipeline(tmp_path, extra_b=", fail_once: true")
    f.write_text(f.read_text() + "resources:\n  b: {retries: 0}\n")
    first = _ctl("run", str(f))
    assert first.returncode == 1
    assert [_state(tmp_path)["stages"][s]["state"] for s in "abc"] == ["succeeded", "failed", "pending"]
    res = _ctl("--store", f"file://{tmp_path}/store", "resume", "t")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming run t: b" in res.stdout
    assert [_state(tmp_path)["stages"][s]["state"] for s in "abc"] == ["succeeded"] * 3
    assert (_runs(tmp_path, "a"), _runs(tmp_path, "b"), _runs(tmp_path, "c")) == (1, 2, 1)  # a stays cached
    nothing = _ctl("--store", f"file://{tmp_path}/store", "resume", "t")
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: run t has no stage waiting for labels, failed, cancelled or interrupted")
