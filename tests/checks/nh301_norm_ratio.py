"""NH301 norm-ratio: per-layer weight-to-gradient norm ratios spread over orders of
magnitude."""

from __future__ import annotations

import torch
from conftest import Case, he, healthy_cases, stack
from torch import nn

from nnhealth.findings import Severity

CODE = "NH301"


def bn_scaled_layer(scale: float) -> nn.Module:
    """Linear-BN-ReLU x3 with one layer's weights scaled: BN makes the output scale-free,
    so that layer's gradient shrinks by the scale while its norm grows by it."""
    model = stack(128, 3, nn.ReLU, he, nn.BatchNorm1d)
    with torch.no_grad():
        model[3].weight.mul_(scale)
    return model


# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "bn-layer-scaled-100x"

BAD = [
    Case("bn-layer-scaled-100x", lambda: bn_scaled_layer(100.0), Severity.WARNING, None),
]

GOOD = [
    Case("healthy-he-relu", lambda: stack(128, 4, nn.ReLU, he)),
    Case("bn-layer-scaled-3x", lambda: bn_scaled_layer(3.0)),
    *healthy_cases(),
]
