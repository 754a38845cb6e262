"""What a model expects of its input (size, channels, normalisation), shared by every data set and the
augmentation presets: one place, below all of them, so no data module imports another for it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    """What a model expects: input size, channels, normalisation and the resampling of its resize (from the
    weights' timm or OpenCLIP config). `interpolation` is the real-image transforms' (data/augment.py), as timm's
    create_transform uses the model's; the embedded benchmark's 8x8 glyphs are always upsampled bilinearly."""

    img_size: int = 32
    in_chans: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"

    def __call__(self, x8: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) in [0, 1] -> (N, in_chans, img_size, img_size), normalised."""
        x = self.resize(x8)
        return self.normalise(x)

    def resize(self, x8: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x8, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, self.in_chans, -1, -1)
        mean = torch.tensor(self.mean[: self.in_chans]).view(1, -1, 1, 1)
        std = torch.tensor(self.std[: self.in_chans]).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()
