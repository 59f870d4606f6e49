"""NH001 nonfinite: NaN/Inf in the weights, the forward pass or only the gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import Case, he, healthy_cases, stack
from torch import nn

from nnhealth.findings import Severity

CODE = "NH001"


def with_nan_weight() -> nn.Module:
    model = stack(64, 2, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return model


def overflowing() -> nn.Module:
    model = stack(64, 2, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight.mul_(1e38)
    return model


class SqrtAtZero(nn.Module):
    """Finite forward, infinite gradient: d sqrt(x)/dx at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.sqrt(F.relu(self.fc(x)) * 0.0))


# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "nan-weight"

BAD = [
    Case("nan-weight", with_nan_weight, Severity.ERROR, "2", inputs=(128, 64)),
    Case("overflow-in-forward", overflowing, Severity.ERROR, "2", inputs=(128, 64)),
    Case("inf-gradient-only", SqrtAtZero, Severity.ERROR, inputs=(128, 16), classes=4),
]

GOOD = [
    Case("healthy-he-relu", lambda: stack(128, 4, nn.ReLU, he)),
    *healthy_cases(),
]
