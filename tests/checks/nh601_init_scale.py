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


def one_weight(w: float | None) -> nn.Module:
    """A tanh stack narrowing to one unit, a Linear(1, 1) (weight ``w``; None: PyTorch's
    default), a tanh and a 4-way head; biases zero."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 1),
        nn.Tanh(),
        nn.Linear(1, 1),
        nn.Tanh(),
        nn.Linear(1, 4),
    )
    with torch.no_grad():
        if w is not None:
            model[6].weight.fill_(w)
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    return model


def one_to_eight() -> nn.Module:
    """Linear(1, 8) -> ReLU -> Linear(8, 1), PyTorch's default init."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))


def regression(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.squeeze(1), y.to(out.dtype))


ONE = {"inputs": (128, 16), "classes": 4}

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

# a Linear(1, 1) is judged by |w|: 1e-4 and 0 are no draw of any rule
BAD += [
    Case("one-weight-1e-4", lambda: one_weight(1e-4), Severity.ERROR, "6", **ONE),
    Case("one-weight-zero", lambda: one_weight(0.0), Severity.ERROR, "6", **ONE),
]

GOOD = [
    # Var(w) of one weight is 0 by definition: not "no signal passes"
    Case("one-weight-default", lambda: one_weight(None), **ONE),
    Case("one-weight-0.7", lambda: one_weight(0.7), **ONE),
    Case("one-to-eight-relu", one_to_eight, inputs=(128, 1), kwargs=(("loss_fn", regression),)),
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
