"""The pipeline file: one YAML document -> validated `Pipeline` (datasets, stages, resources).

A stage is its `kind` plus parameters that map one to one onto the stage command's options
(`replay_fraction: 0.1` -> `--replay-fraction 0.1`). Only which parameters are *inputs* is known
per kind (`unsupft.registry`): their values name a data set or an earlier stage (or are literal URIs), and
they define the DAG. Every error names the file, the field and the line, so a typo in a 200-line
pipeline is found at once, before anything runs.
A stage's `matrix` (`{seed: [0, 1, 2]}`) expands it into one stage per combination before
inputs are resolved (`_expand_matrices`), so nothing after the parser knows matrices exist.

    name: demo
    store: file://./runs
    datasets: {digits: file://./data/digits}
    stages:
      base:  {kind: pretrain, data: [digits], arch: tiny, steps: 200}
      probe: {kind: evaluate, model: {base: base}, train: digits, test: digits}
    resources:
      defaults: {cpu: 2, memory: 4Gi}
      base: {gpus: 1}
"""

from __future__ import annotations

import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unsupft import options as option_table
from unsupft import store
from unsupft.errors import UserError
from unsupft.registry import ENV_PREFIX, PIPELINE_KINDS, STAGES
from unsupft.stage import CHOSEN_PREFIX
from unsupft.trust import TRUST_ENV

# Names become Kubernetes object names and store folders: keep them DNS-label shaped.
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
# A run id (the pipeline's name by default) starts every object name; the operators' webhooks
# want DNS-1035 names (a letter first), and 40 characters leave room for `-<stage>-<attempt>`.
RUN_ID_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
RUN_ID_RULE = "a DNS-1035 name: lower-case letters, digits and '-', starting with a letter (at most 40)"
JOB_APIS = ("auto", "trainjob", "pytorchjob")
RUNTIME_KINDS = ("TrainingRuntime", "ClusterTrainingRuntime")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")  # Kubernetes label values
# A Kubernetes quantity (`cpu`, `memory`), the grammar of k8s.io/apimachinery pkg/api/resource/quantity.go:
# a number (`2`, `1.5`, `.5`, `2.`) and one suffix: binary SI (Ki..Ei), decimal SI (n, u, m, k, M..E) or
# an integer exponent (`e3`). Its parser also takes a lone sign or "." as 0; that is refused here.
QUANTITY_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
QUANTITIES = ("cpu", "memory")
# unsupft's own variables (options `UNSUPFT_<STAGE>_<OPTION>`, the checkpoint trust, tuning): the
# pipeline's parameters say what a stage does, so `resources.env` never sets them.
OWN_ENV_PREFIX = f"{ENV_PREFIX}_"

STRING_MAPS = ("node_selector", "env", "labels", "annotations")
CHOSEN_SUFFIX = ".chosen"  # `<select-source stage>.chosen`: the source it chose, as a data-set input
TOP_FIELDS = ("name", "store", "datasets", "stages", "resources")

Scalar = (str, int, float, bool)


@dataclass(frozen=True)
class Resources:
    image: str = "unsupft:latest"
    cpu: int | float | str = 1
    memory: str = "2Gi"
    gpus: int = 0
    nodes: int = 1
    procs_per_node: int = 1
    retries: int = 2
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    # Cluster-only settings (ignored by the local backend), see docs/cluster.md.
    deadline_s: int = 7 * 24 * 3600  # activeDeadlineSeconds of each attempt
    pending_timeout_s: int = 1800  # how long pods may be stuck (image pull, unschedulable, quota)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    priority_class: str | None = None
    service_account: str | None = None
    image_pull_secrets: list[str] = field(default_factory=list)
    queue: str | None = None  # a Kueue LocalQueue
    job_api: str = "auto"  # multi-process stages: TrainJob or PyTorchJob, "auto" asks the cluster
    runtime: str = "unsupft"  # the runtime a TrainJob refers to ...
    runtime_kind: str = "TrainingRuntime"  # ... in the namespace, or a ClusterTrainingRuntime

    @property
    def processes(self) -> int:
        return self.nodes * self.procs_per_node


def _file_types(hint: Any) -> tuple[type, ...]:
    """The types a pipeline file may give for a field annotated `hint`: `int | float | str` ->
    (int, float, str), `dict[str, str]` -> (dict,), `str | None` -> (str,) (None is only a default)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(t) or t for t in options if t is not type(None))


# resource field -> the types its value may have, from the annotations of `Resources`
RESOURCE_FIELDS = {name: _file_types(hint) for name, hint in typing.get_type_hints(Resources).items()}


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    params: dict[str, Any]  # option name (snake case) -> value; inputs already resolved to URIs
    needs: tuple[str, ...]  # stages this one reads from
    resources: Resources
    # option name -> its line in the pipeline file, so that `unsupft-ctl validate` can point at a value
    # the stage command refuses (checked later against the option table, `ctl.command.check_options`)
    lines: dict[str, int] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Pipeline:
    name: str
    store: str
    datasets: dict[str, str]
    stages: dict[str, Stage]  # in DAG order (every stage after the stages it needs)
    source: dict[str, Any]  # the document as written, frozen into run.json


# Bounds of a pipeline file: far above any real pipeline, far below what hurts.
MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000  # after expanding aliases: run.json stores the document expanded
MAX_STAGES = 1000  # as written and after expanding matrices: far above a real study, far below what hurts


_NUMBER_TAGS = {"tag:yaml.org,2002:int": int, "tag:yaml.org,2002:float": float}
_CONSTRUCTOR = yaml.constructor.SafeConstructor()  # reads one scalar as the loader will (nothing cached)


def _misread_number(node: yaml.ScalarNode) -> str | None:
    """Why a plain number is not the number it reads as, or None.

    YAML 1.1 (PyYAML's SafeLoader) reads `010` as octal 8, `1:30` as 90 (base 60), `0x10` as 16 and
    `0b10` as 2: a person reads ten, a time or a typo, and the stage's own command line (Python's
    int() and float()) reads 10 or refuses the text. A number is accepted when Python reads its text
    as the same value: plain decimals, with a sign or `_` between digits; `.inf` and `.nan` are left
    to the options' ranges."""
    kind = _NUMBER_TAGS.get(node.tag)
    if kind is None or node.style is not None:  # quoted or block scalars are strings
        return None
    value = _CONSTRUCTOR.yaml_constructors[node.tag](_CONSTRUCTOR, node)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    text = node.value
    try:
        if kind(text) == value:
            return None
    except ValueError:
        pass
    digits = text.lstrip("+-").replace("_", "")
    if kind is int and digits[:1] == "0" and digits.isdigit():
        decimal = int(text.replace("_", ""))
        return f"{text} is read as octal {value} by YAML 1.1: write {decimal} without the leading zero (or {value}), or quote it"
    form = {"0x": " (hexadecimal)", "0b": " (binary)"}.get(digits[:2], " (base 60)" if ":" in digits else "")
    return f"{text} is read as {value}{form} by YAML 1.1: write {value}, or quote it"


class _Where:
    """Line numbers of every field of a YAML document, for error messages.

    The walk also bounds the document before anything is built from it: nesting depth, and its size
    with every alias expanded (a "billion laughs" file of a few hundred bytes expands to billions of
    nodes). Each node is walked once, however many aliases point at it, and a recursive alias is an
    error.
    """

    def __init__(self, file: str, node: yaml.Node | None) -> None:
        self.file, self.lines = file, {}
        self.sizes: dict[int, int] = {}  # id(node) -> node count with aliases expanded
        if node is not None:
            self._walk(node, (), set())

    def _walk(self, node: yaml.Node, path: tuple, active: set[int]) -> int:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if id(node) in self.sizes:  # an alias to a node walked before: its size, no second walk
            return self.sizes[id(node)]
        if id(node) in active:
            raise UserError(f"{self.file}:{line}: {self.dotted(path)}: a recursive alias (refers to itself)")
        if len(path) > MAX_DEPTH:
            raise UserError(f"{self.file}:{line}: {self.dotted(path)}: nested deeper than {MAX_DEPTH} levels")
        active.add(id(node))
        size = 1
        if isinstance(node, yaml.ScalarNode) and (misread := _misread_number(node)):
            raise UserError(f"{self.file}:{line}: {self.dotted(path)}: {misread}")
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    raise UserError(f"{self.file}:{key.start_mark.line + 1}: {self.dotted(path)}: "
                                    "a key must be a plain name, not a list or mapping")
                name = key.value
                if misread := _misread_number(key):
                    raise UserError(f"{self.file}:{key.start_mark.line + 1}: {self.dotted(path + (name,))}: {misread}")
                if name in seen:
                    raise UserError(f"{self.file}:{key.start_mark.line + 1}: {self.dotted(path + (name,))}: duplicate key")
                seen.add(name)
                self.lines[path + (name,)] = key.start_mark.line + 1  # the key's line, not its value's
                size += 1 + self._walk(value, path + (name,), active)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                size += self._walk(item, path + (i,), active)
        active.discard(id(node))
        if size > MAX_NODES:
            raise UserError(f"{self.file}:{line}: {self.dotted(path)}: more than {MAX_NODES} values "
                            "with its aliases expanded; a pipeline is far smaller")
        self.sizes[id(node)] = size
        return size

    @staticmethod
    def dotted(path: tuple) -> str:
        """`stages.base.data[0]`, or "(document)" for the document itself."""
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).removeprefix(".")
        return dotted or "(document)"

    def error(self, path: tuple, message: str) -> UserError:
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe)
        where = f"{self.file}:{line}" if line else self.file
        return UserError(f"{where}: {self.dotted(path)}: {message}")


def load(path: str | Path) -> Pipeline:
    """Read and validate a pipeline file; every problem is a `UserError` naming file, field, line."""
    path = Path(path)
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read pipeline file ({exc.strerror})") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: larger than {MAX_BYTES} bytes; a pipeline file is far smaller")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from None
    return parse(text, str(path))


def parse(text: str, file: str = "<pipeline>") -> Pipeline:
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters up front
        raise UserError(f"{file}: malformed YAML ({getattr(exc, 'reason', None) or exc})") from None
    try:
        node = loader.get_single_node()
        where = _Where(file, node)
        doc = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{file}{line}: malformed YAML ({getattr(exc, 'problem', None) or exc})") from None
    except RecursionError:  # the YAML composer recurses per nesting level
        raise UserError(f"{file}: nested too deeply (more than {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()
    return _build(doc, where)


def _expect(where: _Where, path: tuple, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    bad_bool = isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    if not isinstance(value, kind) or bad_bool:
        raise where.error(path, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def _uri(where: _Where, path: tuple, uri: str) -> str:
    """`store.normalize(uri)`, its refusal reported at the field that gave the URI."""
    try:
        return store.normalize(uri)
    except UserError as exc:
        raise where.error(path, str(exc)) from None


def _name(where: _Where, path: tuple, value: Any, what: str) -> str:
    _expect(where, path, value, str, f"a {what} name")
    if not NAME_RE.match(value):
        raise where.error(path, f"{what} name {value!r} must be lower-case letters, digits and '-' (at most 40)")
    return value


def _build(doc: Any, where: _Where) -> Pipeline:
    if not isinstance(doc, dict):
        raise where.error((), "a pipeline is a mapping with name, stages and optionally store, datasets, resources")
    for key in doc:
        if key not in TOP_FIELDS:
            raise where.error((key,), f"unknown field (expected one of {', '.join(TOP_FIELDS)})")
    if "name" not in doc:
        raise where.error((), "missing field 'name'")
    name = _name(where, ("name",), doc["name"], "pipeline")
    if not RUN_ID_RE.match(name):  # the pipeline's name is the default run id
        raise where.error(("name",), f"pipeline name {name!r} is the default run id: {RUN_ID_RULE}")
    store_uri = _expect(where, ("store",), doc.get("store", "file://./runs"), str, "a store URI")
    store_uri = _uri(where, ("store",), store_uri)

    datasets: dict[str, str] = {}
    for ds, uri in _expect(where, ("datasets",), doc.get("datasets") or {}, dict, "a mapping name -> URI").items():
        _name(where, ("datasets", ds), ds, "data set")
        datasets[ds] = _uri(where, ("datasets", ds), _expect(where, ("datasets", ds), uri, str, "a URI"))

    raw_stages = _expect(where, ("stages",), doc.get("stages"), dict, "a mapping of stages")
    if not raw_stages:
        raise where.error(("stages",), "a pipeline needs at least one stage")
    if len(raw_stages) > MAX_STAGES:
        raise where.error(("stages",), f"{len(raw_stages)} stages; a pipeline holds at most {MAX_STAGES}")
    for sname in raw_stages:
        _name(where, ("stages", sname), sname, "stage")
        if sname in datasets:
            raise where.error(("stages", sname), "a stage and a data set share this name")

    resources = _resources(where, doc.get("resources") or {}, raw_stages)
    raw_stages, origin = _expand_matrices(where, raw_stages, datasets)
    # an expansion takes the resources of its stage as written
    stages = {s: _stage(where, s, body, datasets, raw_stages, resources[origin[s]]) for s, body in raw_stages.items()}
    order = _topological(where, {s: stage.needs for s, stage in stages.items()})
    return Pipeline(name, store_uri, datasets, {s: stages[s] for s in order}, doc)


MATRIX = "matrix"


def _expand_matrices(where: _Where, raw_stages: dict[str, Any], datasets: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Stages with a `matrix` -> one stage per combination of its values; inputs bound to expansions.

    The rules (docs/study.md, "`matrix`"):
    - `matrix: {seed: [0, 1], mix: [none, cutmix]}` runs the stage once per combination, with each
      axis set as that option; an expansion is named `<stage>-<value>-<value>` in the axes' order,
      every value lower-cased with each run of other characters than a-z, 0-9 turned into '-'
      (`base-0`, `adapt-1-cutmix`, `lr: 0.03` -> `0-03`); a name that is not a stage name (at most
      40 characters) or that another stage or data set has is an error.
    - An input naming a matrixed stage binds each axis the two stages share to the reading stage's
      own value, and fans out over the axes they do not share: a single input (`init: base`) must end
      on one expansion, a list input gets every expansion, a mapping input's key gets the same suffix
      as its stage (`model: {base: base}` -> `{base-0: base-0, base-1: base-1}`).
    Returns the expanded raw stages in file order and each one's stage as written (for its
    resources and line numbers). Expansion happens before inputs are resolved, so everything after
    the parser (validate, run, status, the kube backend, cache keys) sees plain stages.
    """
    axes_of: dict[str, dict[str, list[Any]]] = {}
    for sname, body in raw_stages.items():
        if isinstance(body, dict) and MATRIX in body and body.get("kind") in PIPELINE_KINDS:
            axes_of[sname] = _matrix_axes(where, sname, body)
    if not axes_of:
        return raw_stages, {s: s for s in raw_stages}
    total = sum(math.prod(map(len, axes.values())) for axes in axes_of.values()) + len(raw_stages) - len(axes_of)
    if total > MAX_STAGES:
        raise where.error(("stages",), f"the matrices make {total} stages; a pipeline holds at most {MAX_STAGES}")
    own_lines: dict[str, list[tuple[tuple, int]]] = {}  # stage as written -> (path below it, line)
    for where_path, line in where.lines.items():
        if where_path[:1] == ("stages",) and len(where_path) > 1 and where_path[1] in axes_of:
            own_lines.setdefault(where_path[1], []).append((where_path[2:], line))
    expanded: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for sname, body in raw_stages.items():
        if not isinstance(body, dict) or body.get("kind") not in PIPELINE_KINDS:
            expanded[sname], origin[sname] = body, sname  # `_stage` says what is wrong with it
            continue
        axes = axes_of.get(sname, {})
        for combo in itertools.product(*axes.values()):
            values = dict(zip(axes, combo))
            name = _expansion_name(sname, combo)
            path = ("stages", sname, MATRIX) if axes else ("stages", sname)
            if not NAME_RE.match(name):
                raise where.error(path, f"the expansion {name!r} is not a stage name (lower-case letters, digits "
                                        "and '-', at most 40): shorten the stage name or the values")
            if name in expanded or name in datasets or (name != sname and name in raw_stages):
                raise where.error(path, f"the expansion {name!r} collides with "
                                        f"{'a data set' if name in datasets else 'another stage or expansion'} of that name")
            stage_body = {k: v for k, v in body.items() if k != MATRIX}
            inputs = STAGES[body["kind"]].inputs
            for key, value in body.items():
                if isinstance(key, str) and key.replace("-", "_") in inputs:
                    stage_body[key] = _bind(where, ("stages", sname, key), value, values, axes_of)
            stage_body.update(values)
            expanded[name], origin[name] = stage_body, sname
            if name != sname:  # the expansion's fields point at the lines of the stage as written
                for below, line in own_lines.get(sname, []):
                    where.lines.setdefault(("stages", name) + below, line)
                for axis in values:
                    where.lines[("stages", name, axis)] = where.lines.get(("stages", sname, MATRIX, axis),
                                                                          where.lines[path])
    return expanded, origin


def _matrix_axes(where: _Where, sname: str, body: dict[str, Any]) -> dict[str, list[Any]]:
    """The checked `matrix` of a stage: option name (snake case) -> its values, in file order."""
    path = ("stages", sname, MATRIX)
    kind = body["kind"]
    matrix = body[MATRIX]
    if not isinstance(matrix, dict) or not matrix:
        raise where.error(path, "a matrix is a mapping of option names to lists of values, e.g. {seed: [0, 1, 2]}")
    known = option_table.load().get(kind, {})
    given = {k.replace("-", "_") for k in body if isinstance(k, str) and k not in ("kind", MATRIX)}
    axes: dict[str, list[Any]] = {}
    for axis, values in matrix.items():
        apath = path + (axis,)
        option = axis.replace("-", "_") if isinstance(axis, str) else axis
        if option not in known or option in ("out", "overwrite"):
            raise where.error(apath, f"'{kind}' has no option --{str(axis).replace('_', '-')} to vary")
        if option in STAGES[kind].inputs:
            raise where.error(apath, "an input cannot be a matrix axis; write one stage per input instead")
        if option in given:
            raise where.error(apath, "given both as a parameter and as a matrix axis")
        if not isinstance(values, list) or not values:
            raise where.error(apath, "expected a non-empty list of values")
        for i, value in enumerate(values):
            if not isinstance(value, Scalar):
                raise where.error(apath + (i,), f"a matrix value is a scalar, got {type(value).__name__}")
        axes[option] = values
    return axes


def _expansion_name(sname: str, combo: tuple[Any, ...]) -> str:
    return "-".join([sname, *(re.sub(r"[^a-z0-9]+", "-", str(v).lower()).strip("-") for v in combo)])


def _bind(where: _Where, path: tuple, value: Any, values: dict[str, Any], axes_of: dict[str, dict[str, list[Any]]]) -> Any:
    """An input's references to matrixed stages -> the expansions they bind to (see `_expand_matrices`)."""

    def expansions(ref: Any, p: tuple) -> list[tuple[str, str]]:
        """(suffix from the axes not shared, expansion name) per expansion `ref` reaches."""
        if not isinstance(ref, str) or ref not in axes_of:
            return [("", ref)]
        axes = axes_of[ref]
        for axis, own in values.items():
            if axis in axes and own not in axes[axis]:
                raise where.error(p, f"{axis} {own!r} of this stage is not a value of {ref}'s matrix axis {axis} "
                                     f"({', '.join(map(str, axes[axis]))})")
        free = [a for a in axes if a not in values]
        found = []
        for combo in itertools.product(*(axes[a] for a in free)):
            chosen = {**values, **dict(zip(free, combo))}
            found.append((_expansion_name("", combo).lstrip("-"), _expansion_name(ref, tuple(chosen[a] for a in axes))))
        return found

    if isinstance(value, list):
        return [name for i, ref in enumerate(value) for _, name in expansions(ref, path + (i,))]
    if isinstance(value, dict):
        mapped: dict[Any, Any] = {}
        for key, ref in value.items():
            for suffix, name in expansions(ref, path + (key,)):
                new_key = f"{key}-{suffix}" if suffix else key
                if new_key in mapped:
                    raise where.error(path + (key,), f"the fanned-out key {new_key!r} is given twice")
                mapped[new_key] = name
        return mapped
    found = expansions(value, path)
    if len(found) > 1:
        free = [a for a in axes_of[value] if a not in values]
        raise where.error(path, f"{value} is a matrix over {', '.join(free)}, which this stage does not share: "
                                f"a single input binds to one expansion (give this stage the same matrix axes, "
                                f"or name one expansion, e.g. {found[0][1]})")
    return found[0][1]


def _stage(where: _Where, sname: str, body: Any, datasets: dict[str, str], stages: dict, resources: Resources) -> Stage:
    path = ("stages", sname)
    _expect(where, path, body, dict, "a mapping with 'kind' and the stage's parameters")
    kind = body.get("kind")
    if kind not in PIPELINE_KINDS:
        raise where.error(path + ("kind",), f"kind must be one of {', '.join(PIPELINE_KINDS)}, got {kind!r}")
    params: dict[str, Any] = {}
    lines: dict[str, int] = {}
    needs: set[str] = set()
    for key, value in body.items():
        if key == "kind":
            continue
        ppath = path + (key,)
        if not isinstance(key, str) or not re.match(r"^[a-z][a-z0-9_-]*$", key):
            raise where.error(ppath, "parameter names are lower-case option names (e.g. replay_fraction)")
        key = key.replace("-", "_")
        if key == "out":
            raise where.error(ppath, "the controller sets each stage's output; remove 'out'")
        if key in STAGES[kind].inputs:
            value = _resolve_inputs(where, ppath, value, datasets, stages, needs, sname)
        else:
            _check_value(where, ppath, value)
        params[key] = value
        if ppath in where.lines:
            lines[key] = where.lines[ppath]
    return Stage(sname, kind, params, tuple(sorted(needs)), resources, lines)


def _check_value(where: _Where, path: tuple, value: Any) -> None:
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    if not all(isinstance(v, Scalar) for v in values):
        raise where.error(path, "a parameter is a scalar, a list of scalars or a mapping of scalars")


def _resolve_inputs(where, path, value, datasets, stages, needs, sname):
    """Data set and stage names -> URIs (stage outputs are filled in per run: `stage:<name>`).

    `<stage>.chosen` is the source a select-source stage chose, for an input taking a data set:
    `chosen:stage:<name>`, rendered as `chosen:<its output URI>` and resolved by the stage that
    reads it (`unsupft.stage.resolve_chosen`), since the choice exists only once that stage ran."""

    def chosen(ref: str, p: tuple) -> str:
        source = ref[: -len(CHOSEN_SUFFIX)]
        if source not in stages:
            raise where.error(p, f"unknown reference {ref!r} (no stage {source!r} to take the chosen source of)")
        body = stages[source]
        source_kind = body.get("kind") if isinstance(body, dict) else None
        if source_kind != "select-source":
            raise where.error(p, f"{ref!r}: stage {source!r} is a {source_kind!r} stage; only a select-source stage chooses a source")
        spec = STAGES[stages[sname]["kind"]]
        param = path[2].replace("-", "_")
        if param not in spec.datasets:
            takes = ", ".join(spec.datasets) or "none"
            raise where.error(p, f"{ref!r} is a data set, and '{spec.name}' takes no data set as {param} "
                                 f"(its data-set inputs: {takes}; one value each, not NAME=... pairs)")
        if source == sname:
            raise where.error(p, "a stage cannot read its own output")
        needs.add(source)
        return f"{CHOSEN_PREFIX}stage:{source}"

    def one(ref: Any, p: tuple) -> str:
        _expect(where, p, ref, str, "a data set name, a stage name or a URI")
        if ref in datasets:
            return datasets[ref]
        if ref in stages:
            if ref == sname:
                raise where.error(p, "a stage cannot read its own output")
            needs.add(ref)
            return f"stage:{ref}"
        if "://" in ref or ref.startswith(("/", "./")):
            return _uri(where, p, ref)
        if ref.endswith(CHOSEN_SUFFIX):
            return chosen(ref, p)
        raise where.error(p, f"unknown reference {ref!r} (not a data set, a stage or a URI)")

    if isinstance(value, list):
        return [one(v, path + (i,)) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: one(v, path + (k,)) for k, v in value.items()}
    return one(value, path)


def _resources(where: _Where, raw: Any, stages: dict) -> dict[str, Resources]:
    _expect(where, ("resources",), raw, dict, "a mapping with 'defaults' and per-stage entries")
    for key in raw:
        if key != "defaults" and key not in stages:
            raise where.error(("resources", key), "unknown stage (expected 'defaults' or a stage name)")

    def fields(key: str) -> dict[str, Any]:
        body = _expect(where, ("resources", key), raw.get(key) or {}, dict, "a mapping of resource fields")
        for fname, value in body.items():
            path = ("resources", key, fname)
            if fname not in RESOURCE_FIELDS:
                raise where.error(path, f"unknown field (expected one of {', '.join(RESOURCE_FIELDS)})")
            _expect(where, path, value, RESOURCE_FIELDS[fname], "/".join(t.__name__ for t in RESOURCE_FIELDS[fname]))
            if fname in ("gpus", "retries") and value < 0 or fname in ("nodes", "procs_per_node", "deadline_s", "pending_timeout_s") and value < 1:
                raise where.error(path, f"out of range: {value}")
            if fname in STRING_MAPS and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise where.error(path, "keys and values are strings (quote numbers and booleans)")
            if fname == "env" and not all(ENV_NAME_RE.match(k) for k in value):
                raise where.error(path, f"environment variable names are letters, digits and '_': {sorted(value)}")
            for variable in value if fname == "env" else ():
                if own_variable(variable):
                    raise where.error(path + (variable,), _own_variable_refusal(variable))
            if fname in QUANTITIES and not QUANTITY_RE.match(str(value)):  # what `kube._resources` renders
                raise where.error(path, f"{value!r} is not a Kubernetes quantity (a number with an optional suffix: "
                                        "cpu 2, 0.5 or 500m; memory 512Mi, 4Gi or 4G)")
            if fname in QUANTITIES and str(value).startswith("-"):
                raise where.error(path, f"out of range: {value} (Kubernetes refuses negative requests)")
            if (fname == "labels" and not all(LABEL_VALUE_RE.match(v) for v in value.values())
                    or fname == "queue" and not LABEL_VALUE_RE.match(value)):
                raise where.error(path, "label values are at most 63 letters, digits, '-', '_' or '.', "
                                        "beginning and ending with a letter or digit")
            if fname == "image_pull_secrets" and not all(isinstance(v, str) for v in value):
                raise where.error(path, "image pull secrets are a list of Secret names")
            for name, allowed in (("job_api", JOB_APIS), ("runtime_kind", RUNTIME_KINDS)):
                if fname == name and value not in allowed:
                    raise where.error(path, f"expected one of {', '.join(allowed)}, got {value!r}")
            if fname == "tolerations" and not all(isinstance(t, dict) for t in value):
                raise where.error(path, "tolerations are a list of mappings")
        return body

    defaults = fields("defaults")
    out = {}
    for s in stages:
        own = fields(s)
        merged = {**defaults, **own}
        for key in ("env", "labels", "annotations"):  # per-stage entries add to the defaults' ones
            merged[key] = {**defaults.get(key, {}), **own.get(key, {})}
        res = Resources(**merged)
        if res.gpus and res.gpus < res.procs_per_node:
            key = s if "gpus" in own or "procs_per_node" in own else "defaults"
            raise where.error(("resources", key, "gpus"),
                              f"stage {s}: {res.gpus} GPUs for {res.procs_per_node} processes per node (one GPU per process)")
        out[s] = res
    return out


def own_variable(name: str) -> bool:
    """Whether an environment variable is one of unsupft's own, which a pipeline never sets."""
    return name.upper().startswith(OWN_ENV_PREFIX)


def _own_variable_refusal(name: str) -> str:
    """Why `resources.env` may not set `name`, and what to write instead."""
    refusal = "a pipeline cannot set unsupft's own variables (UNSUPFT_*)"
    if name.upper() == TRUST_ENV:
        return f"{refusal}: it would trust the checkpoints of every stage; ask for it per stage with trust_checkpoint: true"
    for spec in STAGES.values():
        prefix = spec.env_name("")
        if name.upper().startswith(prefix) and len(name) > len(prefix):
            option = name[len(prefix):].lower()
            return (f"{refusal}: it would set --{option.replace('_', '-')} of {spec.name} stages behind their cache keys; "
                    f"give {option} as a parameter of the stage")
    return (f"{refusal}: the pipeline's parameters say what a stage does; set {name} where the stages run "
            "(the controller's environment, the image)")


def _topological(where: _Where, deps: dict[str, tuple[str, ...]]) -> list[str]:
    """Stages in DAG order (stable: file order among independent stages); a cycle is an error."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = placed

    def visit(s: str, path: list[str]) -> None:
        if state.get(s) == 2:
            return
        if state.get(s) == 1:
            cycle = path[path.index(s):] + [s]
            raise where.error(("stages", s), f"cycle: {' -> '.join(cycle)}")
        state[s] = 1
        for d in deps[s]:
            visit(d, path + [s])
        state[s] = 2
        order.append(s)

    for s in deps:
        visit(s, [])
    return order
