"""NH102 saturation: sigmoid/tanh units stuck near their bounds."""

from __future__ import annotations

import math

from conftest import Case, he, healthy_cases, stack, xavier
from torch import nn

from nnhealth.findings import Severity

CODE = "NH102"

# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "tanh-w-randn"
# the layer-table columns this check puts on its finding's row
COLUMNS = {"saturated_units", "saturated_fraction", "mean_derivative"}

BAD = [
    Case("tanh-w-randn", lambda: stack(128, 5, nn.Tanh, lambda n: 1.0), Severity.ERROR),
    # seed 1: seed 0 prints a mean derivative 1e-5 (relative) from a rounding edge
    Case(
        "sigmoid-large",
        lambda: stack(128, 4, nn.Sigmoid, lambda n: 1.0, seed=1),
        Severity.ERROR,
    ),
    Case(
        "tanh-mildly-large",
        lambda: stack(128, 3, nn.Tanh, lambda n: 2.2 / math.sqrt(n)),
        Severity.WARNING,
    ),
]

GOOD = [
    Case("xavier-tanh", lambda: stack(128, 5, nn.Tanh, xavier)),
    Case("relu-cannot-saturate", lambda: stack(128, 4, nn.ReLU, lambda n: 1.0)),
    Case("healthy-he-relu", lambda: stack(128, 4, nn.ReLU, he)),
    *healthy_cases(),
]
