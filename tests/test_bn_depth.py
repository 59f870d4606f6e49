"""NH202 over the whole depth of a plain normalized stack (BatchNorm makes gradients grow
at every block at init: Yang et al., ICLR 2019), and severities that follow the total
change over depth (NH201, NH202)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import sensitivities
from scipy import stats
from torch import nn

import nnhealth
from nnhealth.analyzers.gradient_variance import (
    GradientVariance,
    norm_chains,
    sequential_link,
    whole_depth,
)
from nnhealth.capture.instrument import run_pass
from nnhealth.findings import Severity
from nnhealth.plan import Plan


def bn_mlp(depth: int, width: int, nested: bool = False, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    blocks = [[nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()] for _ in range(depth)]
    body = [nn.Sequential(*b) for b in blocks] if nested else [m for b in blocks for m in b]
    return nn.Sequential(*body, nn.Linear(width, 10))


def batch(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, d, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def capture(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    loss = lambda out: nn.functional.cross_entropy(out, y)
    return run_pass(model, x, loss, Plan(), examples=x.shape[0])


def nh202(cap) -> list:
    """NH202's findings on a capture, at its default options."""
    check = GradientVariance()
    return check.run(cap, {o.name: o.default for o in check.options})


def brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """E_n ||y_n||^2 * E_n ||g_n||^2 of every hidden Linear's output, from the tensors."""
    hidden = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
    return sensitivities(model, x, y, hidden)


def test_stack_points_and_factor_against_brute_force() -> None:
    """The stack's points are the hidden layers' sensitivities (rel 1e-5); its factor is
    the Theil-Sen slope of their logs (scipy) within 2%, projected over every layer."""
    model, (x, y) = bn_mlp(12, 128), batch(128, 128)
    expected = brute_force(model, x, y)
    ((pts, norms),) = norm_chains(capture(model, x, y))
    assert norms == 11 and [n for n, _, _ in pts] == list(expected)[::-1]
    for name, value, _ in pts:
        assert value == pytest.approx(expected[name], rel=1e-5), name
    trend, _ = whole_depth(capture(model, x, y))
    logs = [math.log(v) for v in list(expected.values())[::-1]]  # from the output back
    slope = stats.theilslopes(logs).slope
    assert trend.factor == pytest.approx(math.exp(slope), rel=0.02)
    assert trend.total == pytest.approx(trend.factor**11, rel=1e-12)
    assert (trend.first_name, trend.last_name, trend.depth) == ("33", "0", 12)


def test_per_block_factor_is_mean_field() -> None:
    """x pi/(pi-1) = 1.467 per BatchNorm+ReLU block (Yang et al.), measured x1.47 at
    width 256, batch 128, 32 blocks; nested Sequentials are the same stack."""
    x, y = batch(128, 256)
    for nested in (False, True):
        cap = capture(bn_mlp(32, 256, nested), x, y)
        trend, norms = whole_depth(cap)
        assert norms == 31 and trend.depth == 32
        assert trend.factor == pytest.approx(math.pi / (math.pi - 1), rel=0.03)
        (f,) = nh202(cap)
        assert f.severity == Severity.ERROR and f.kind == "normalized-stack"


def test_strided_conv_stack_keeps_its_factor() -> None:
    """A conv BatchNorm stack that halves its resolution midway: slopes are taken
    between convs of one shape, so the stride does not add its own factor (x1.43 per
    block measured without it)."""

    def conv_stack(stride_at: int | None) -> nn.Sequential:
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
        for i in range(11):
            stride = 2 if i == stride_at else 1
            layers += [nn.Conv2d(16, 16, 3, stride, 1), nn.BatchNorm2d(16), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    plain, _ = whole_depth(capture(conv_stack(None), x, y))
    strided, _ = whole_depth(capture(conv_stack(5), x, y))
    assert plain.depth == strided.depth == 12
    assert 1.3 < plain.factor < 1.6
    assert strided.factor == pytest.approx(plain.factor, rel=0.1)


def test_sequential_links() -> None:
    assert sequential_link("3", "4") and sequential_link("features.0", "features.3")
    assert sequential_link("3.0", "4.0") and sequential_link("block.0.0", "block.1.0")
    assert not sequential_link("layer1.0.conv1", "layer1.0.conv2")  # a residual block
    assert not sequential_link("blocks.0.fc", "blocks.1.fc")
    assert not sequential_link("stem", "head")
    assert not sequential_link("features.0", "classifier.0")


def test_residual_blocks_and_short_stacks_are_not_stacks() -> None:
    """A residual BN net of the BAD case's depth has no plain stack; 4 BN blocks are
    a stack well below the warning (x2.6)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(64, 64), nn.BatchNorm1d(64)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return torch.relu(h + self.bn(self.fc(h)))

    torch.manual_seed(0)
    residual = nn.Sequential(nn.Linear(64, 64), *(Block() for _ in range(50)), nn.Linear(64, 10))
    cap = capture(residual, *batch(64, 64))
    assert norm_chains(cap) == [] and nh202(cap) == []
    cap = capture(bn_mlp(4, 256), *batch(128, 256))
    trend, _ = whole_depth(cap)
    assert trend.depth == 4 and trend.total < 10 and nh202(cap) == []


def test_vgg16_bn_is_not_flagged() -> None:
    """VGG-16-BN trains at the usual lr; its 13 convs change x1.7e3 at batch 4, 32x32."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.vgg16_bn(num_classes=10)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    cap = capture(model, x, y)
    trend, norms = whole_depth(cap)
    assert trend.depth == 13 and norms == 12 and 1e2 < trend.total < 1e4
    assert nh202(cap) == []


# ---- severity follows the total change over depth ----------------------------------


def default_stack(depth: int, width: int, act: type[nn.Module], std: float | None = None):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if std is not None:
            with torch.no_grad():
                lin.weight.normal_(0, std)
                lin.bias.zero_()
        layers += [lin, act()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def severities(model: nn.Module, data) -> dict[str, tuple[Severity, float]]:
    report = nnhealth.scan(model, data, select=["NH201", "NH202"])
    return {f.code: (f.severity, f.evidence["total_ratio"]) for f in report.findings}


def test_gelu_depth_sets_the_severity() -> None:
    """PyTorch's default init with GELU: 4 layers train (NH201 warns, NH202 is silent),
    10 layers do not (NH202 error)."""
    data = batch(128, 256)
    four = severities(default_stack(4, 256, nn.GELU), data)
    assert set(four) == {"NH201"} and four["NH201"][0] == Severity.WARNING
    assert 1e-4 < four["NH201"][1] < 1e-2
    ten = severities(default_stack(10, 256, nn.GELU), data)
    assert ten["NH202"][0] == Severity.ERROR and ten["NH202"][1] < 1e-4


def test_classic_tanh_experiment_is_an_error() -> None:
    """5 x 500 tanh, W = 0.01 randn, 1000 x 500 inputs: x(500 * 1e-4)^4 = 6.25e-6."""
    found = severities(default_stack(5, 500, nn.Tanh, 0.01), batch(1000, 500))
    severity, total = found["NH201"]
    assert severity == Severity.ERROR and total == pytest.approx(0.05**4, rel=0.1)
