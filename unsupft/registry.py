"""Every `unsupft` stage command, declared once.

A `StageSpec` names the command, where its Click command lives (imported only when it runs, so
`unsupft --help` and `unsupft-ctl` never import torch), the example its help shows, and, for the
stages a pipeline can hold, which parameters are inputs (data sets or earlier stages: the edges of
the pipeline's DAG). The CLI (`unsupft.cli`), the controller (`unsupft.ctl.spec`: kinds and
inputs; `unsupft.ctl.local`: the environment it keeps from stages) and the static option table
(`unsupft.options`) all read this list. Adding a stage is one entry here, then
`make options-table`.

Every option of a stage can also come from the environment as `UNSUPFT_<STAGE>_<OPTION>`, named
after the flag (`UNSUPFT_TRANSFER_EPOCHS=5`, `UNSUPFT_BN_ADAPT_DATA=...`), not after the Python
parameter (`--split` is the field `test_fraction` of `ingest`).
"""

from __future__ import annotations

from dataclasses import dataclass

ENV_PREFIX = "UNSUPFT"


@dataclass(frozen=True)
class StageSpec:
    name: str
    command: str  # "module:attribute" of its click.Command
    example: str  # shown under the command's --help
    inputs: tuple[str, ...] | None = None  # parameters naming data sets or stages; None: not a pipeline stage
    # The inputs among them that take one data set per value (not a model, a key file or NAME=URI
    # pairs): where a pipeline may pass the source a `select-source` stage chose.
    datasets: tuple[str, ...] = ()

    def env_name(self, flag: str) -> str:
        """The environment variable of an option (`--batch-size` -> UNSUPFT_BN_ADAPT_BATCH_SIZE);
        with an empty flag, the prefix every variable of this stage starts with."""
        return f"{ENV_PREFIX}_{self.name}_{flag.lstrip('-')}".upper().replace("-", "_")


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("ingest", "unsupft.stages.ingest:ingest_command",
              "unsupft ingest sklearn:digits data/digits --split 0.3 --seed 0"),
    StageSpec("pretrain", "unsupft.stages.pretrain:pretrain_command",
              "unsupft pretrain --data data/src/train --arch tiny --steps 100 --batch-size 64 --out runs/base",
              inputs=("data", "target", "init"), datasets=("data", "target")),
    StageSpec("bn-adapt", "unsupft.stages.bn_adapt:bn_adapt_command",
              "unsupft bn-adapt --init runs/base --data data/tgt/train --out runs/bn",
              inputs=("init", "data"), datasets=("data",)),
    StageSpec("adapt", "unsupft.stages.adapt:adapt_command",
              "unsupft adapt --init runs/base --target data/tgt/train --replay-source data/src/train "
              "--mix cutmix --steps 60 --batch-size 64 --out runs/adapt",
              inputs=("init", "target", "replay_source"), datasets=("target", "replay_source")),
    StageSpec("transfer", "unsupft.stages.transfer:transfer_command",
              "unsupft transfer --init runs/adapt --train data/tgt/train --shots 4 --method coin "
              "--test data/tgt/test --out runs/coin",
              inputs=("init", "train", "labels", "test"), datasets=("train", "test")),
    StageSpec("semi", "unsupft.stages.semi:semi_command",
              "unsupft semi --init runs/adapt --train data/tgt/train --shots 4 --unlabeled data/tgt/train "
              "--test data/tgt/test --steps 500 --out runs/semi",
              inputs=("init", "train", "unlabeled", "test", "labels"),
              datasets=("train", "unlabeled", "test")),
    StageSpec("select-source", "unsupft.stages.select_source:select_source_command",
              "unsupft select-source --init runs/base --candidate a=data/src-a/train --candidate b=data/src-b/train "
              "--probe-train data/tgt/train --probe-test data/tgt/test --steps 200 --out runs/select",
              inputs=("init", "candidate", "target", "probe_train", "probe_test"),
              datasets=("target", "probe_train", "probe_test")),
    StageSpec("label", "unsupft.stages.label:label_command",
              "unsupft label --init runs/adapt --data data/tgt/train --test data/tgt/test --budget 2 "
              "--annotator manual --out runs/label",
              inputs=("init", "data", "test"), datasets=("data", "test")),
    StageSpec("evaluate", "unsupft.stages.evaluate:evaluate_command",
              "unsupft evaluate --model base=runs/base --model adapt=runs/adapt --train data/tgt/train "
              "--test data/tgt/test --shots 1,4 --baseline base --label label=runs/label --out runs/eval",
              inputs=("model", "train", "test", "label"), datasets=("train", "test")),
    StageSpec("study", "unsupft.stages.study:study_command",
              "unsupft study --report uft-0=runs/eval-0 --report uft-1=runs/eval-1 "
              "--claim 'uft-1shot=uft: adapt vs base @ fewshot_1_top1' --out runs/study",
              inputs=("report",)),
    StageSpec("annotate", "unsupft.stages.annotate:annotate_command", "unsupft annotate runs/label"),
)}

# The kinds a pipeline may hold, in the order `unsupft-ctl validate` names them.
PIPELINE_KINDS = tuple(name for name, spec in STAGES.items() if spec.inputs is not None)


def option_env_prefixes() -> tuple[str, ...]:
    """The environment-variable prefix of each stage's options (`UNSUPFT_BN_ADAPT_`, ...)."""
    return tuple(spec.env_name("") for spec in STAGES.values())
