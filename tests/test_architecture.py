"""The layering of docs/architecture.md, checked on the source: imports flow one way.

core (the top-level modules) <- libraries (in the order below) <- stages <- the two command lines
(`unsupft.cli`, `unsupft.ctl`). Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unsupft"

CORE = {"unsupft", "unsupft._torchvision", "unsupft.checkpoint", "unsupft.distributed", "unsupft.errors",
        "unsupft.lease", "unsupft.options", "unsupft.preprocess", "unsupft.registry", "unsupft.seeding",
        "unsupft.stage", "unsupft.store", "unsupft.trust"}
# A library may import the core and the libraries before it, never one after it.
LIBRARIES = ("unsupft.losses", "unsupft.data", "unsupft.models", "unsupft.train", "unsupft.eval", "unsupft.select")
STAGES = "unsupft.stages"
# A stage imports libraries and the core; of the other stages only the helper pretrain and adapt
# share, and select-source runs pretrain itself (its candidates are ordinary pretrain outputs).
STAGE_IMPORTS = {"unsupft.stages.moco_common"}
STAGE_REUSES = {("unsupft.stages.select_source", "unsupft.stages.pretrain")}
COMMAND_LINES = ("unsupft.cli", "unsupft.__main__", "unsupft.ctl")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imported(path: Path) -> set[str]:
    """The unsupft modules `path` imports (`from unsupft import store` -> unsupft.store)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_module = PACKAGE.parent / candidate.replace(".", "/")
                is_module = as_module.with_suffix(".py").exists() or (as_module / "__init__.py").exists()
                names.add(candidate if is_module else node.module)
    return {n for n in names if within(n, "unsupft")}


def allowed(importer: str, target: str) -> bool:
    if target in CORE:
        return True
    if importer in CORE:
        return False
    for rank, library in enumerate(LIBRARIES):
        if within(importer, library):
            return any(within(target, earlier) for earlier in LIBRARIES[:rank + 1])
    if within(importer, STAGES):
        if within(target, STAGES):
            return target in STAGE_IMPORTS or (importer, target) in STAGE_REUSES
        return any(within(target, library) for library in LIBRARIES)
    if within(importer, "unsupft.ctl"):
        return within(target, "unsupft.ctl")
    return importer in ("unsupft.__main__",) and target == "unsupft.cli"


def layer_known(module: str) -> bool:
    return module in CORE or any(within(module, p) for p in (*LIBRARIES, STAGES, *COMMAND_LINES))


def test_every_module_has_a_layer():
    unknown = [module_name(p) for p in PACKAGE.rglob("*.py") if not layer_known(module_name(p))]
    assert unknown == [], f"add these to a layer in tests/test_architecture.py and docs/architecture.md: {unknown}"


def test_imports_flow_one_way():
    wrong = sorted(f"{module_name(p)} imports {target}" for p in PACKAGE.rglob("*.py")
                   for target in imported(p) if not allowed(module_name(p), target))
    assert wrong == [], "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    # the rules themselves: a library importing a stage, data importing train, the core importing a
    # library, ctl importing a stage are refused; the reverse directions pass
    assert not allowed("unsupft.train.transfer", "unsupft.stages.transfer")
    assert not allowed("unsupft.data.mixing", "unsupft.train.batches")
    assert not allowed("unsupft.stage", "unsupft.data.samples")
    assert not allowed("unsupft.ctl.spec", "unsupft.stages.pretrain")
    assert not allowed("unsupft.stages.semi", "unsupft.stages.transfer")
    assert allowed("unsupft.stages.adapt", "unsupft.stages.moco_common")
    assert allowed("unsupft.stages.transfer", "unsupft.train.transfer") and allowed("unsupft.train.loop", "unsupft.store")
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from unsupft.stages import evaluate\nfrom unsupft import store, data\n")
    assert imported(module) == {"unsupft.stages.evaluate", "unsupft.store", "unsupft.data"}


@pytest.mark.parametrize("pipeline", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_controller_imports_neither_torch_nor_numpy(pipeline):
    # validate, and the modules the in-cluster driver runs (its image has no training libraries)
    code = ("import sys\nfrom unsupft.ctl import cli, kube, kubeapi, kubedriver, local\ntry:\n"
            "    cli.main(['validate', sys.argv[1]])\nexcept SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('torch', 'numpy', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(pipeline)], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.splitlines()[-1] == "0 []", out
