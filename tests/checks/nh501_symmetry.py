"""NH501 symmetry: units of a layer that can never become different."""

from __future__ import annotations

import torch
from conftest import Case, he, healthy_cases, stack, upstream_symmetry
from torch import nn

from nnhealth.findings import Severity

CODE = "NH501"


def duplicated_units(count: int) -> nn.Module:
    """He MLP whose hidden layer 2 has ``count`` copies of unit 0 (net2net-style widening)."""
    model = stack(128, 3, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight[1 : count + 1] = model[2].weight[0]
        model[2].bias[1 : count + 1] = model[2].bias[0]
    return model


def zero_head() -> nn.Module:
    model = stack(128, 2, nn.ReLU, he)
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.zero_()
    return model


def frozen_constant() -> nn.Module:
    model = stack(128, 2, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight.fill_(0.01)
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "constant-init"
# the layer-table columns this check puts on its finding's row
COLUMNS = {"symmetry_groups", "effective_width"}

BAD = [
    Case(
        "zero-init",
        lambda: stack(64, 3, nn.ReLU, lambda n: 0.0),
        Severity.ERROR,
        "0",
        inputs=(128, 64),
    ),
    Case(
        "constant-init",
        lambda: stack(64, 3, nn.Tanh, lambda n: 0.0, seed=1),
        Severity.ERROR,
        "2",
        inputs=(128, 64),
    ),
    Case("three-copied-units", lambda: duplicated_units(3), Severity.WARNING, "2"),
    Case("symmetry-created-upstream", upstream_symmetry, Severity.WARNING, "3"),
]

GOOD = [
    Case("healthy-he-relu", lambda: stack(128, 4, nn.ReLU, he)),
    Case("zero-output-layer-only", zero_head),
    Case("frozen-constant-layer", frozen_constant),
    *healthy_cases(),
]
