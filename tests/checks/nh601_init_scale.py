"""NH601 init-scale: weight variance far from the He/Xavier/LeCun target."""

from __future__ import annotations

import torch
from conftest import CNN_INPUTS, Case, he, healthy_cases, small_cnn, stack, xavier, zero_head
from torch import nn

from nnhealth.findings import Finding, Severity

CODE = "NH601"


def one_layer_scaled(factor: float) -> nn.Module:
    model = stack(128, 2, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight.mul_(factor)
    return model


def cnn_scaled(factor: float) -> nn.Module:
    model = small_cnn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(factor)
    return model


# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "default-init-deep-relu"

BAD = [
    Case("default-init-deep-relu", lambda: stack(128, 6, nn.ReLU, None), Severity.ERROR, "0"),
    Case("default-init-4-relu", lambda: stack(128, 4, nn.ReLU, None), Severity.WARNING, "0"),
    Case("xavier-scale-deep-relu", lambda: stack(128, 8, nn.ReLU, xavier), Severity.WARNING, "0"),
    Case("tanh-0.01", lambda: stack(128, 5, nn.Tanh, lambda n: 0.01), Severity.ERROR, "0"),
    Case("one-layer-100x", lambda: one_layer_scaled(10.0), Severity.WARNING, "2"),
    # scale-invariant behind BatchNorm: the step, not the signal (effective step x1e4)
    Case(
        "convs-x0.012-before-batchnorm",
        lambda: cnn_scaled(0.012),
        Severity.WARNING,
        "any",
        inputs=CNN_INPUTS,
    ),
]

GOOD = [
    Case("healthy-he-relu", lambda: stack(128, 8, nn.ReLU, he)),
    Case("xavier-tanh", lambda: stack(128, 8, nn.Tanh, xavier)),
    Case("default-init-shallow-relu", lambda: stack(128, 1, nn.ReLU, None)),
    Case("tiny-init-batchnorm", lambda: stack(128, 6, nn.Tanh, lambda n: 0.01, nn.BatchNorm1d)),
    *healthy_cases(),
]


def head_is_info(findings: list[Finding], model: nn.Module) -> None:
    (finding,) = findings
    assert finding.severity == Severity.INFO and finding.layer == "6"
    assert finding.evidence["grad_norm"] > 0


BAD.append(
    # frozen at zero: no gradient moves it, so it is not the deliberate zero init
    Case("zero-head-frozen", lambda: zero_head(frozen=True), Severity.ERROR, "6")
)
GOOD.append(Case("zero-init-head", zero_head, verify=head_is_info))
