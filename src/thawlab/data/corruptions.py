"""Input-level corruptions with severities 1-5, on batches of images in [0, 1] (N, C, H, W).

The constants are those of CIFAR-10-C (Hendrycks and Dietterich, ICLR 2019,
github.com/hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py), which were chosen for 32x32
images: the size at which the embedded benchmark feeds its models. Each function is a re-implementation
in torch with a seeded generator, so a corrupted test set is the same on every machine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# severity 1..5 -> parameter, as in make_cifar_c.py
CONSTANTS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of additive noise
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity (Poisson)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of salt-and-pepper pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the image mean
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-scale factor before box up-scaling
}
NAMES = tuple(CONSTANTS)


def _gaussian_noise(x, c, g):
    return x + torch.randn(x.shape, generator=g) * c


def _shot_noise(x, c, g):
    return torch.poisson(x * c, generator=g) / c


def _impulse_noise(x, c, g):
    u = torch.rand(x.shape, generator=g)
    salt = torch.rand(x.shape, generator=g) < 0.5
    return torch.where(u < c, salt.to(x.dtype), x)


def _gaussian_blur(x, sigma, g):
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _contrast(x, c, g):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def _pixelate(x, c, g):
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(int(h * c), int(w * c)), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


_FUNCTIONS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "pixelate": _pixelate,
}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1-5) to images `x` in [0, 1]; returns images in [0, 1]."""
    if name not in CONSTANTS:
        raise ValueError(f"unknown corruption {name!r} (choose from {', '.join(NAMES)})")
    if not 1 <= severity <= 5:
        raise ValueError(f"corruption severity {severity!r} is not in 1..5")
    g = torch.Generator().manual_seed(seed)
    return _FUNCTIONS[name](x.float(), CONSTANTS[name][severity - 1], g).clamp(0.0, 1.0)
