"""NH102 saturation: sigmoid/tanh units stuck near their bounds."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from conftest import Case, he, healthy_cases, stack, xavier
from torch import nn

from nnhealth.findings import Severity

CODE = "NH102"

# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "tanh-w-randn"
# the layer-table columns this check puts on its finding's row
COLUMNS = {"saturated_units", "saturated_fraction", "mean_derivative"}


def sigmoid_head(bias: float = 0.0, scale: float = 1.0, outputs: int = 1) -> nn.Sequential:
    """Linear(128, 32)-tanh (Xavier) then Linear(32, outputs)-sigmoid, whose
    pre-activations have std ``scale`` and mean ``bias``: the model's output is the
    sigmoid's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 32), nn.Tanh(), nn.Linear(32, outputs), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.normal_(0, xavier(128))
        model[0].bias.zero_()
        model[2].weight.normal_(0, scale / math.sqrt(32))
        model[2].bias.fill_(bias)
    return model


def odd_class(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """0/1 targets from class labels (their parity), shaped like ``like``."""
    return (y % 2).to(like.dtype).reshape(-1, 1).expand_as(like)


def mse_on_probs(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, odd_class(y, out))


def bce_on_probs(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(out, odd_class(y, out))


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
    # the model's output sigmoid, pre-activations near +8, MSE on its values: the loss
    # does not undo the saturation (loss sensitivity 1e-3)
    Case(
        "sigmoid-output-mse",
        lambda: sigmoid_head(bias=8.0),
        Severity.ERROR,
        "3",
        kwargs=(("loss_fn", mse_on_probs),),
    ),
]

GOOD = [
    Case("xavier-tanh", lambda: stack(128, 5, nn.Tanh, xavier)),
    Case("relu-cannot-saturate", lambda: stack(128, 4, nn.ReLU, lambda n: 1.0)),
    Case("healthy-he-relu", lambda: stack(128, 4, nn.ReLU, he)),
    # the same saturated output with BCE on its values: dL/dz = y - t, intact
    Case("sigmoid-output-bce", lambda: sigmoid_head(bias=8.0), kwargs=(("loss_fn", bce_on_probs),)),
    # ten sigmoids at std 16 under the automatic loss: about 70% saturated, the gradient
    # still passes through the rest
    Case("sigmoid-output-auto-loss", lambda: sigmoid_head(scale=16.0, outputs=10)),
    *healthy_cases(),
]
