"""NH103 norm-collapse: normalization layers whose scale (gamma) collapsed to zero."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Case, he, healthy_cases, stack
from torch import nn

from nnhealth.findings import Finding, Severity

CODE = "NH103"


def with_norm(norm: type[nn.Module], scale: float, frozen: bool = False) -> nn.Module:
    """He MLP (Linear-norm-ReLU x3) whose second norm layer's scale is multiplied by
    ``scale`` (and frozen)."""
    model = stack(128, 3, nn.ReLU, he, norm)
    with torch.no_grad():
        model[4].weight.mul_(scale)
    model[4].weight.requires_grad_(not frozen)
    return model


def rms_measured(findings: list[Finding], model: nn.Module) -> None:
    (finding,) = findings
    gamma = model[4].weight.detach().double()
    assert finding.evidence["scale_rms"] == pytest.approx(
        float(gamma.norm()) / math.sqrt(gamma.numel()), rel=1e-6
    )
    assert finding.evidence["values"] == 128


class ZeroInitResidual(nn.Module):
    """Two residual blocks x + BN(Linear(ReLU(Linear(x)))) whose last BN scale starts at
    zero, as torchvision's ResNet(zero_init_residual=True) does: healthy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Sequential(
                nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.BatchNorm1d(128)
            )
            nn.init.zeros_(block[3].weight)
            self.blocks.append(block)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x)


def zero_init_is_info(findings: list[Finding], model: nn.Module) -> None:
    assert [f.layer for f in findings] == ["blocks.0.3", "blocks.1.3"]
    assert all(f.severity == Severity.INFO and f.evidence["grad_norm"] > 0 for f in findings)


# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "decayed-layernorm"

BAD = [
    Case(
        "decayed-layernorm",
        lambda: with_norm(nn.LayerNorm, 1e-5),
        Severity.WARNING,
        "4",
        verify=rms_measured,
    ),
    Case(
        "frozen-zero-batchnorm",
        lambda: with_norm(nn.BatchNorm1d, 0.0, frozen=True),
        Severity.ERROR,
        "4",
    ),
    # zero scale and zero shift before a ReLU: outputs 0, ReLU'(0) = 0, no gradient
    Case("zero-batchnorm-before-relu", lambda: with_norm(nn.BatchNorm1d, 0.0), Severity.ERROR, "4"),
]


class PreNorm(nn.Module):
    """x + fc(ln(x)) then a head, the LayerNorm's gain at zero: fc reads a constant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln, self.fc, self.head = nn.LayerNorm(128), nn.Linear(128, 128), nn.Linear(128, 10)
        nn.init.zeros_(self.ln.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc(self.ln(x)))


BAD.append(Case("zero-gain-before-a-layer", PreNorm, Severity.ERROR, "ln"))

GOOD = [
    Case("zero-init-residual", ZeroInitResidual, verify=zero_init_is_info),
    Case("small-but-alive-layernorm", lambda: with_norm(nn.LayerNorm, 0.05)),
    Case("layernorm-without-affine", lambda: stack(128, 3, nn.ReLU, he, _plain_layernorm)),
    Case("healthy-he-relu", lambda: stack(128, 4, nn.ReLU, he)),
    *healthy_cases(),
]


def _plain_layernorm(width: int) -> nn.Module:
    return nn.LayerNorm(width, elementwise_affine=False)
