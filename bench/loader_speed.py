"""Two-view MoCo batches/s: the seeded, resumable loader against bare augmentation.

`pretrain` and `adapt` get their batches from `LoaderBatches`, which runs every sample's
augmentation under its own seed (so a resumed run sees the same images). That seeding must cost
little next to the augmentation itself, because on a GPU node the step is fast and the loader is
what limits images/s. Three variants make two MoCo v2 views of 28x28 grayscale images, batch 256,
in one process with the same thread count, interleaved over rounds (best round reported):

- `bare`: a plain loop, `augment(x)` twice per sample, stacked (no seeding, not resumable): the peer;
- `loader`: `unsupft.stages.moco_common.two_view_batches` with 0 workers (what the stages run);
- `loader, torch.manual_seed`: the same loader with each sample seeded by `torch.manual_seed`, as
  it was before: that also queues a seed for every accelerator backend and records a stack trace.

    PYTHONPATH=. python bench/loader_speed.py [--batches 8] [--rounds 3] [--augment crop,jitter,gray,blur,flip]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from in_memory import TensorImages
from unsupft.data.augment import DEFAULT_AUGMENTS, moco_v2_augment, parse_augments
from unsupft.preprocess import to_input
from unsupft.train.batches import SeededDataset
from unsupft.stages.moco_common import two_view_batches

BATCH = 256


def bare(images: torch.Tensor, augments, n_batches: int) -> None:
    augment = moco_v2_augment(images.shape[-2:], augments)
    for b in range(n_batches):
        chunk = images[b * BATCH:(b + 1) * BATCH]
        torch.stack([to_input(augment(x)) for x in chunk]), torch.stack([to_input(augment(x)) for x in chunk])


def loader(images: torch.Tensor, augments, n_batches: int) -> None:
    for _ in two_view_batches(TensorImages(images), images.shape[-2:], augments, BATCH, 0, None, 0).batches(0, n_batches):
        pass


class _GlobalSeeded(SeededDataset):
    """The per-sample seeding as it was: `torch.manual_seed`, which seeds every backend."""

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            return self.fn(index)
        finally:
            torch.set_rng_state(outer)


def loader_global_seed(images: torch.Tensor, augments, n_batches: int) -> None:
    source = two_view_batches(TensorImages(images), images.shape[-2:], augments, BATCH, 0, None, 0)
    source.dataset = _GlobalSeeded(source.dataset.n, source.dataset.fn)
    for _ in source.batches(0, n_batches):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--augment", default=",".join(DEFAULT_AUGMENTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    augments = parse_augments(args.augment)
    images = torch.randint(0, 256, (args.batches * BATCH, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    variants = {"bare": bare, "loader": loader, "loader, torch.manual_seed": loader_global_seed}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(images, augments, args.batches)
            rates[name].append(args.batches * BATCH / (time.perf_counter() - start))
    best = {name: max(r) for name, r in rates.items()}
    print(json.dumps({"augment": list(augments), "threads": args.threads, "batch": BATCH,
                      "samples_per_s": {k: [round(v) for v in r] for k, r in rates.items()},
                      "best": {k: round(v) for k, v in best.items()},
                      "loader_over_bare": round(best["loader"] / best["bare"], 3),
                      "loader_over_global_seed": round(best["loader"] / best["loader, torch.manual_seed"], 3)},
                     indent=1))


if __name__ == "__main__":
    main()
