"""torchvision must import and work on the CPU torch even when its CUDA extension cannot load."""

import torch

from unsupft._torchvision import torchvision


def test_resnet_forward_and_backward():
    model = torchvision.models.resnet18(num_classes=10)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.conv1.weight.grad is not None


def test_transforms_v2_pipeline():
    from torchvision.transforms import v2

    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(24, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
            v2.RandomGrayscale(0.2),
            v2.GaussianBlur(3),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    image = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    out = pipeline(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
