"""NH202 gradient-variance: the loss's sensitivity to each layer's output vanishing or
exploding from the output back to the input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    Case,
    case_batch,
    he,
    healthy_cases,
    relu_cnn_avgpool,
    stack,
    xavier,
    zero_head,
)
from scipy import integrate, optimize
from torch import nn

import nnhealth
from nnhealth.findings import Finding, Severity

CODE = "NH202"

# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "tanh-w-randn-deeper"


def _gauss(f, q: float) -> float:
    """E[f(sqrt(q) z)], z ~ N(0, 1)."""
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return integrate.quad(lambda z: f(math.sqrt(q) * z) * pdf(z), -12, 12)[0]


def mean_field_chi(sigma_w2: float) -> float:
    """Per-layer backward gain of a wide tanh chain (Poole et al. 2016, Schoenholz et al.
    2017): chi = sigma_w^2 E[tanh'(h)^2] at the fixed point q* = sigma_w^2 E[tanh(h)^2].
    The forward energy is constant at q*, so the sensitivity grows by chi per layer."""
    q = optimize.brentq(lambda q: sigma_w2 * _gauss(lambda h: math.tanh(h) ** 2, q) - q, 1e-3, 50)
    return sigma_w2 * _gauss(lambda h: (1 - math.tanh(h) ** 2) ** 2, q)


def chaotic_factor_matches_mean_field(findings: list[Finding], model: nn.Module) -> None:
    (f,) = findings
    assert f.evidence["verdict"] == "exploding"
    assert f.evidence["factor_per_layer"] == pytest.approx(mean_field_chi(2.0), rel=0.03)


def sigmoid_net(depth: int) -> nn.Sequential:
    """PyTorch's default init with sigmoid: the derivative is at most 1/4."""
    return stack(128, depth, nn.Sigmoid, None)


def sigmoid_cnn() -> nn.Sequential:
    """Six 3x3 convs with sigmoid, pooled into a linear head: vanishing in a conv net
    (the pooling divides each position's gradient by H*W; that alone is not flagged)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.Sigmoid()]
    for _ in range(5):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class _ScaledBlock(nn.Module):
    """A ConvNeXt-style residual block: LayerNorm, MLP, layer scale 1e-6."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)
        self.gamma = nn.Parameter(torch.full((width,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc2(self.act(self.fc1(self.norm(x))))


class LayerScaleNet(nn.Module):
    """A stem, six layer-scaled residual blocks and a head: the branches are 1e-6 of the
    stream by design, which is not depth."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(128, 32)
        self.blocks = nn.ModuleList(_ScaledBlock(32) for _ in range(6))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def bn_stack(depth: int, width: int = 256) -> nn.Sequential:
    """depth Linear-BatchNorm1d-ReLU blocks, PyTorch's default init, then a 10-way head."""
    return stack(width, depth, nn.ReLU, None, nn.BatchNorm1d)


class _ResidualBN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(width, width), nn.BatchNorm1d(width)
        self.fc2, self.bn2 = nn.Linear(width, width), nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.fc1(x)))
        return torch.relu(x + self.bn2(self.fc2(h)))


def residual_bn(blocks: int = 25, width: int = 256) -> nn.Sequential:
    """The BAD stack's 50 normalized layers in 25 residual blocks: a stem, the blocks, a head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, width), *(_ResidualBN(width) for _ in range(blocks)), nn.Linear(width, 10)
    )


def whole_stack_explodes(findings: list[Finding], model: nn.Module) -> None:
    """Mean field (Yang et al. 2019): x pi/(pi-1) = 1.467 per BatchNorm+ReLU block."""
    (f,) = findings
    assert f.kind == "normalized-stack" and f.evidence["verdict"] == "exploding"
    assert f.evidence["depth"] == 50 and f.evidence["normalization_layers"] == 49
    assert f.evidence["factor_per_layer"] == pytest.approx(math.pi / (math.pi - 1), rel=0.03)
    assert "residual" in f.fix and "clip_grad_norm_" in f.fix_snippet


def at_most_warning(findings: list[Finding], model: nn.Module) -> None:
    """4 GELU layers at PyTorch's default init train: neither depth check may fail CI."""
    report = nnhealth.scan(model, case_batch(GELU_4), select=["NH201", "NH202"])
    assert all(f.severity <= Severity.WARNING for f in report.findings), report.findings


GELU_4 = Case("gelu-4-default-init", lambda: stack(256, 4, nn.GELU, None), inputs=(128, 256))


def homogeneous_vanishing_is_nh201(findings: list[Finding], model: nn.Module) -> None:
    """tanh near 0 is linear: each layer shrinks the signal and the gradient alike, so
    the sensitivity is the same at every layer and every weight gradient is equally small
    (uniform relative updates). The fault is the forward scale: NH201 reports it."""
    report = nnhealth.scan(model, case_batch(BAD_NH201_ALIKE), select=["NH201"])
    assert [f.severity for f in report.findings] == [Severity.ERROR]


BAD_NH201_ALIKE = Case("tanh-0.01", lambda: stack(128, 5, nn.Tanh, lambda n: 0.01))

BAD = [
    Case("sigmoid-20-default-init", lambda: sigmoid_net(20), Severity.ERROR, None),
    Case("sigmoid-cnn-avgpool", sigmoid_cnn, Severity.ERROR, None, inputs=(8, 3, 16, 16)),
    Case(
        "tanh-w-randn-exploding",
        lambda: stack(128, 5, nn.Tanh, lambda n: 1.0),
        Severity.WARNING,
        None,
    ),
    Case(
        "tanh-w-randn-deeper",
        lambda: stack(128, 8, nn.Tanh, lambda n: 1.0),
        Severity.ERROR,
        None,
    ),
    Case(
        "bn-relu-50-stack",
        lambda: bn_stack(50),
        Severity.ERROR,
        None,
        inputs=(128, 256),
        verify=whole_stack_explodes,
    ),
    Case(
        "he-tanh-60-chaotic",
        lambda: stack(128, 60, nn.Tanh, he, seed=2),
        Severity.WARNING,
        None,
        verify=chaotic_factor_matches_mean_field,
    ),
]

GOOD = [
    Case("healthy-he-relu", lambda: stack(128, 6, nn.ReLU, he)),
    Case("xavier-tanh", lambda: stack(128, 6, nn.Tanh, xavier)),
    Case("tiny-init-batchnorm", lambda: stack(128, 6, nn.Tanh, lambda n: 0.01, nn.BatchNorm1d)),
    Case("default-cnn-avgpool", relu_cnn_avgpool, inputs=(4, 3, 32, 32)),
    Case("bn-relu-4-stack", lambda: bn_stack(4), inputs=(128, 256)),
    Case("residual-bn-50", residual_bn, inputs=(128, 256)),
    Case(GELU_4.id, GELU_4.build, inputs=GELU_4.inputs, verify=at_most_warning),
    Case("layer-scale-residual", LayerScaleNet, inputs=(16, 128)),
    # He-init tanh 30 deep: mean-field chi 1.106 per layer, x18 in all, below warn_ratio
    Case("he-tanh-30-mild", lambda: stack(128, 30, nn.Tanh, he)),
    Case(
        "tanh-0.01-homogeneous",
        BAD_NH201_ALIKE.build,
        verify=homogeneous_vanishing_is_nh201,
    ),
    *healthy_cases(),
]


def behind_zero_head(findings: list[Finding], model: nn.Module) -> None:
    (finding,) = findings
    assert finding.severity == Severity.INFO and finding.evidence["output_layer"] == "6"


# a frozen zero head never moves: the gradient below it is zero for good
BAD.append(Case("zero-head-frozen", lambda: zero_head(frozen=True), Severity.ERROR, None))
GOOD.append(Case("zero-init-head", zero_head, verify=behind_zero_head))
