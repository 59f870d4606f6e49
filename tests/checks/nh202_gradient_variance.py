"""NH202 gradient-variance: gradient variance vanishing or exploding from output to
input."""

from __future__ import annotations

from conftest import Case, he, healthy_cases, stack, xavier, zero_head
from torch import nn

from nnhealth.findings import Finding, Severity

CODE = "NH202"

# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "tanh-0.01-vanishing"

BAD = [
    Case(
        "tanh-0.01-vanishing",
        lambda: stack(128, 5, nn.Tanh, lambda n: 0.01),
        Severity.ERROR,
        None,
    ),
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
]

GOOD = [
    Case("healthy-he-relu", lambda: stack(128, 6, nn.ReLU, he)),
    Case("xavier-tanh", lambda: stack(128, 6, nn.Tanh, xavier)),
    Case("tiny-init-batchnorm", lambda: stack(128, 6, nn.Tanh, lambda n: 0.01, nn.BatchNorm1d)),
    *healthy_cases(),
]


def behind_zero_head(findings: list[Finding], model: nn.Module) -> None:
    (finding,) = findings
    assert finding.severity == Severity.INFO and finding.evidence["output_layer"] == "6"


# a frozen zero head never moves: the gradient below it is zero for good
BAD.append(Case("zero-head-frozen", lambda: zero_head(frozen=True), Severity.ERROR, None))
GOOD.append(Case("zero-init-head", zero_head, verify=behind_zero_head))
