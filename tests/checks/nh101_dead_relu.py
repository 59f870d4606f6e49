"""NH101 dead-relu: ReLU units that are zero for every example."""

from __future__ import annotations

import pytest
import torch
from conftest import Case, he, healthy_cases, stack
from torch import nn

from nnhealth.findings import Finding, Severity

CODE = "NH101"


def dead_bias(fraction: float) -> nn.Module:
    """He MLP whose layer 2 has a bias of -20 on ``fraction`` of its units."""
    model = stack(128, 3, nn.ReLU, he)
    with torch.no_grad():
        model[2].bias.fill_(0.01)
        model[2].bias[: int(fraction * 128)] = -20.0
    return model


def dead_counted(findings: list[Finding], model: nn.Module) -> None:
    (finding,) = findings
    assert finding.evidence["dead_units"] == int(0.6 * 128)
    assert finding.evidence["dead_fraction"] == pytest.approx(int(0.6 * 128) / 128)
    assert 'model.get_submodule("2")' in finding.fix_snippet
    assert "LeakyReLU" in finding.fix_snippet


def conv_bn_negative_shift() -> nn.Module:
    """Conv-BN-ReLU whose BatchNorm shift of -20 keeps every channel below 0."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 2),
    )
    with torch.no_grad():
        model[1].bias.fill_(-20.0)
    return model


def snippet_resets_the_norm(findings: list[Finding], model: nn.Module) -> None:
    (finding,) = findings
    assert 'model.get_submodule("1")' in finding.fix_snippet
    assert "nn.init.zeros_(norm.bias)" in finding.fix_snippet
    exec(finding.fix_snippet, {"model": model, "nn": nn})  # noqa: S102 (runs as written)
    assert float(model[1].bias.detach().abs().max()) == 0.0


# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "most-units-dead"
# the layer-table columns this check puts on its finding's row
COLUMNS = {"dead_units", "dead_fraction"}

BAD = [
    Case("most-units-dead", lambda: dead_bias(0.6), Severity.ERROR, "3", verify=dead_counted),
    Case("some-units-dead", lambda: dead_bias(0.2), Severity.WARNING, "3"),
    Case("batch-too-small", lambda: dead_bias(0.6), Severity.INFO, None, inputs=(8, 128)),
    Case(
        "dead-after-batchnorm",
        conv_bn_negative_shift,
        Severity.ERROR,
        "2",
        inputs=(16, 3, 8, 8),
        classes=2,
        verify=snippet_resets_the_norm,
    ),
]

GOOD = [
    Case("healthy-he-relu", lambda: stack(128, 4, nn.ReLU, he)),
    Case("few-dead-below-threshold", lambda: dead_bias(0.05)),
    Case("leaky-relu-never-dead", lambda: stack(128, 3, nn.LeakyReLU, lambda n: 0.0)),
    *healthy_cases(),
]
