"""Classification heads put on the backbone's pooled features (timm `num_classes=0` output)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(x))

    def fc_input(self, x):
        """What fc sees at evaluation (dropout off): the features themselves (the L-BFGS probe fits fc on it)."""
        return x


class MLPHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.0):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.GELU(), nn.Dropout(dropout))
        self.fc = nn.Linear(hidden_dim, num_classes)

    def forward(self, x):
        return self.fc(self.hidden(x))


class CosineHead(nn.Module):
    """Logits = scale * cosine(feature, class weight): insensitive to the feature norm (Chen et al. 2019)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) * in_features**-0.5)
        self.scale = scale

    def forward(self, x):
        return self.scale * F.linear(F.normalize(self.dropout(x), dim=-1), F.normalize(self.weight, dim=-1))
