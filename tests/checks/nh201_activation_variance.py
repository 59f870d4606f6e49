"""NH201 activation-variance: activation variance shrinking or growing geometrically
with depth."""

from __future__ import annotations

import pytest
from conftest import Case, he, healthy_cases, stack
from torch import nn

from nnhealth.findings import Finding, Severity

CODE = "NH201"


def factor_matches_theory(findings: list[Finding], model: nn.Module) -> None:
    """tanh(s) ~ s for small s, so Var grows by n Var(w) = 128 * 1e-4 per layer."""
    assert findings[0].evidence["factor_per_layer"] == pytest.approx(128 * 1e-4, rel=0.1)
    assert findings[0].evidence["verdict"] == "vanishing"
    assert "xavier_normal_" in findings[0].fix_snippet


# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "tanh-0.01-vanishing"

BAD = [
    Case(
        "tanh-0.01-vanishing",
        lambda: stack(128, 5, nn.Tanh, lambda n: 0.01),
        Severity.ERROR,
        None,
        verify=factor_matches_theory,
    ),
    Case(
        "relu-2x-he-exploding",
        lambda: stack(128, 6, nn.ReLU, lambda n: 2 * he(n)),
        Severity.WARNING,
        None,
    ),
    Case("default-init-deep-relu", lambda: stack(128, 6, nn.ReLU, None), Severity.WARNING, None),
    Case(
        "zero-init",
        lambda: stack(64, 3, nn.ReLU, lambda n: 0.0),
        Severity.ERROR,
        None,
        inputs=(128, 64),
    ),
]

GOOD = [
    Case("healthy-he-relu", lambda: stack(128, 6, nn.ReLU, he)),
    Case("default-init-shallow-relu", lambda: stack(128, 2, nn.ReLU, None)),
    Case("tiny-init-batchnorm", lambda: stack(128, 6, nn.Tanh, lambda n: 0.01, nn.BatchNorm1d)),
    Case("tiny-init-layernorm", lambda: stack(128, 6, nn.ReLU, lambda n: 0.001, nn.LayerNorm)),
    *healthy_cases(),
]
