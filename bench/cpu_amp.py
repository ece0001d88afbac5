"""Is bf16 autocast / channels-last worth it on this CPU for the tiny ResNet?

Times forward+backward+SGD steps of the tiny backbone (batch 256, 32x32, 1 channel) with fp32,
bf16 autocast, and channels-last, interleaved in rounds so load from other processes hits all
variants alike. `train(amp="auto")` picks bf16 on CPUs only where this shows a gain.

    PYTHONPATH=. python bench/cpu_amp.py [--rounds 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from unsupft.models import build_backbone
from unsupft.train.loop import cpu_has_native_bf16


def step_time(bf16: bool, channels_last: bool, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = build_backbone("tiny", 1)
    head = torch.nn.Linear(model.out_dim, 10)
    x = torch.randn(batch, 1, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        with ctx:
            loss = F.cross_entropy(head(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms oneDNN's caches
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    variants = {"fp32": (False, False), "bf16": (True, False), "fp32+channels_last": (False, True),
                "bf16+channels_last": (True, True)}
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (bf16, cl) in variants.items():
            results[name].append(step_time(bf16, cl, args.steps, args.batch))
    base = min(results["fp32"])
    print(json.dumps({
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(), "batch": args.batch,
        "step_s_best": {k: round(min(v), 4) for k, v in results.items()},
        "speedup_vs_fp32": {k: round(base / min(v), 3) for k, v in results.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
