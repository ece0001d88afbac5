"""MoCo v2 augmentations (torchvision.transforms.v2), scaled for small images.

The MoCo v2 recipe is random resized crop (scale 0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1; p=0.8),
random grayscale (p=0.2), Gaussian blur (sigma 0.1-2, p=0.5) and horizontal flip. The blur kernel
is ~10% of the image side as in the recipe (23 px at 224), so a 32 px image gets a 3 px kernel
instead of a kernel that wipes it out. Colour operations leave 1-channel images alone where they
have no meaning (saturation, hue, grayscale). Which of them run is a list of names
(`DEFAULT_AUGMENTS`), so data without a meaningful left-right (digits) can drop "flip".
"""

from __future__ import annotations

from typing import Sequence

import unsupft._torchvision  # noqa: F401  (must precede torchvision imports)
from torchvision.transforms import v2

from unsupft.errors import UserError

DEFAULT_AUGMENTS = ("crop", "jitter", "gray", "blur", "flip")
DEFAULT_CROP_SCALE = 0.2  # MoCo v2's smallest crop, as a share of the image's area


def moco_v2_augment(image_size: Sequence[int], augments: Sequence[str] = DEFAULT_AUGMENTS,
                    crop_scale: float = DEFAULT_CROP_SCALE) -> v2.Compose:
    """A random view of a uint8 [C, H, W] image, still uint8 (apply `to_input` after). The crop
    covers between `crop_scale` and all of the image's area: at 28 px a 0.2 crop is a 12 px patch."""
    unknown = set(augments) - set(DEFAULT_AUGMENTS)
    if unknown:
        raise UserError(f"unknown augmentation(s) {sorted(unknown)} (choose from {', '.join(DEFAULT_AUGMENTS)})")
    size = [int(s) for s in image_size]
    kernel = max(3, int(0.1 * min(size)) // 2 * 2 + 1)
    steps = {
        "crop": v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True),
        "jitter": v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        "gray": v2.RandomGrayscale(p=0.2),
        "blur": v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        "flip": v2.RandomHorizontalFlip(),
    }
    return v2.Compose([steps[name] for name in DEFAULT_AUGMENTS if name in augments])


def parse_augments(text: str) -> tuple[str, ...]:
    """`"crop,jitter,flip"` -> names; `"none"` -> no augmentation."""
    names = tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")
    moco_v2_augment((8, 8), names)  # validates
    return names
