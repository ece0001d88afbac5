"""ACKMeans against random selection in `unsupft label`, at budgets 1+1, 1+3, 1+5, over seeds.

Runs the real label loop (oracle annotator, `ce` finetuning from the same init each round) on a
labeled target set and reports the final test accuracy per selector, budget and seed, plus the mean
and std per (selector, budget). The init is a given model (e.g. an `adapt` or `pretrain` output);
without one a randomly initialised tiny backbone is used, which shows the selection effect on weak
features only.

    PYTHONPATH=. python bench/label_study.py --data D --test T [--init MODEL] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from unsupft.data import load_arrays
from unsupft.select.progressive import LabelConfig, TransferEngine, load_target, make_annotator, run_label


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--init", default=None)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1, 3, 5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-round", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--method", default="ce")
    args = ap.parse_args()
    target = load_target(args.data)
    t = load_arrays(args.test)
    test = (t.images, t.labels)
    engine = TransferEngine()
    with tempfile.TemporaryDirectory(prefix="label-study-") as tmp:
        init = args.init
        if init is None:
            from unsupft.models import build_backbone, save_model

            init = str(Path(tmp) / "init" / "model.pt")
            save_model(init, build_backbone("tiny", target.images.shape[1]), "tiny", target.images.shape[1],
                       list(target.images.shape[-2:]))
        results: dict[tuple[str, float], list[float]] = {}
        for budget in args.budgets:
            for selector in ("ackmeans", "random"):
                for seed in args.seeds:
                    out = str(Path(tmp) / f"{selector}-{budget}-{seed}")
                    cfg = LabelConfig(init=init, data=args.data, out=out, test=args.test, budget=budget,
                                      per_round=args.per_round, selector=selector, method=args.method,
                                      epochs=args.epochs, seed=seed)
                    t0 = time.perf_counter()
                    state = run_label(cfg, target, make_annotator(cfg, target), engine, test, log=lambda _: None)
                    acc = state.rounds[-1]["test_top1"]
                    results.setdefault((selector, budget), []).append(acc)
                    print(json.dumps({"selector": selector, "budget": budget, "seed": seed, "labels": len(state.labeled),
                                      "test_top1": round(acc, 4), "seconds": round(time.perf_counter() - t0, 1)}),
                          flush=True)
        for (selector, budget), accs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(json.dumps({"summary": f"1+{budget:g}", "selector": selector,
                              "mean": round(statistics.mean(accs), 4), "std": round(statistics.pstdev(accs), 4)}))


if __name__ == "__main__":
    main()
