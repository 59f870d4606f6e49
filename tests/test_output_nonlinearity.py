"""NH102 on the nonlinearity that produces the model's output: judged only when the loss
does not undo its saturation, by the loss sensitivity sqrt(n) ||dL/dz|| / L at its
pre-activations z (saturation.loss_sensitivity)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnhealth
from nnhealth.analyzers.saturation import Saturation, loss_sensitivity
from nnhealth.capture.instrument import run_pass
from nnhealth.findings import Severity
from nnhealth.plan import Plan

N = 128
THRESHOLD = {o.name: o.default for o in Saturation.options}["collapse_sensitivity"]


def head(bias: float = 0.0, scale: float = 1.0, outputs: int = 1, act=nn.Sigmoid) -> nn.Module:
    """Linear(16, 32)-tanh then Linear(32, outputs)-act, pre-activations of std ``scale``
    around ``bias``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, outputs), act())
    with torch.no_grad():
        model[0].weight.normal_(0, 0.25)
        model[0].bias.zero_()
        model[2].weight.normal_(0, scale / math.sqrt(32))
        model[2].bias.fill_(bias)
    return model


def batch(outputs: int = 1, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, 16, generator=gen)
    t = torch.randint(0, 2, (N, outputs), generator=gen).float()
    return x, (2 * t - 1 if signed else t)


def mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, t)


def bce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(out, t)


def brute_force(model: nn.Module, x: torch.Tensor, loss_of) -> float:
    """sqrt(n) ||dL/dz|| / L with z the last Linear's output, by autograd."""
    z = model[:3](x)
    loss = loss_of(model[3](z))
    (g,) = torch.autograd.grad(loss, z)
    g = g.double()
    return math.sqrt(g.numel()) * float(g.norm()) / float(loss.detach())


def measured(model: nn.Module, x: torch.Tensor, loss_of) -> float | None:
    capture = run_pass(model, x, loss_of, Plan(saturation_derivative=0.05), examples=N)
    (out,) = [s for s in capture.sites if s.is_output]
    return loss_sensitivity(capture, out)


@pytest.mark.parametrize(
    ("bias", "loss"), [(8.0, "mse"), (8.0, "bce"), (0.0, "mse"), (-12.0, "bce")]
)
def test_sensitivity_matches_autograd(bias: float, loss: str) -> None:
    x, t = batch()
    model = head(bias=bias)
    loss_of = {"mse": lambda o: mse(o, t), "bce": lambda o: bce(o, t)}[loss]
    # float32 gradient moments against a float64 norm of the same float32 gradient
    assert measured(model, x, loss_of) == pytest.approx(brute_force(model, x, loss_of), rel=1e-5)


def test_sensitivity_is_free_of_the_loss_scale() -> None:
    x, t = batch()
    model = head(bias=8.0)
    one = measured(model, x, lambda o: mse(o, t))
    hundred = measured(model, x, lambda o: 100 * F.mse_loss(o, t, reduction="sum"))
    assert hundred == pytest.approx(one, rel=1e-4)


def test_the_threshold_separates_measured_cases() -> None:
    """The numbers collapse_sensitivity is justified by (its doc and the docstring)."""
    x, t = batch()
    x10, t10 = batch(10)
    cls = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(3))
    intact = [
        measured(head(bias=8.0), x, lambda o: bce(o, t)),
        measured(head(bias=-12.0), x, lambda o: bce(o, t)),
        measured(head(bias=8.0, outputs=10), x10, lambda o: bce(o, t10)),
        measured(head(scale=16.0, outputs=10), x10, lambda o: F.cross_entropy(o, cls)),
        measured(head(), x, lambda o: mse(o, t)),
    ]
    collapsed = [
        measured(head(bias=8.0), x, lambda o: mse(o, t)),
        measured(head(bias=-12.0), x, lambda o: mse(o, t)),
        measured(head(bias=8.0, outputs=10), x10, lambda o: F.cross_entropy(o, cls)),
    ]
    assert min(intact) > 5 * THRESHOLD, intact
    assert max(collapsed) < THRESHOLD / 5, collapsed


def scan(model: nn.Module, data, loss_fn=None, **kwargs) -> list:
    report = nnhealth.scan(model, data, loss_fn, select=["NH102"], **kwargs)
    assert not report.errors
    return [f for f in report.findings if f.severity >= Severity.WARNING]


def test_mse_on_a_saturated_sigmoid_output_is_an_error() -> None:
    (finding,) = scan(head(bias=8.0), batch(), mse)
    assert finding.severity == Severity.ERROR and finding.layer == "3"
    assert finding.evidence["loss_sensitivity"] < THRESHOLD
    assert "model's output" in finding.message and "BCEWithLogitsLoss" in finding.fix
    # the snippet's re-initialization takes the output out of saturation
    model = head(bias=8.0)
    exec(finding.fix_snippet, {"model": model, "nn": nn})  # noqa: S102 (our snippet)
    assert scan(model, batch(), mse) == []


def test_mse_on_a_saturated_tanh_output_is_an_error() -> None:
    (finding,) = scan(head(bias=4.0, act=nn.Tanh), batch(signed=True), mse)
    assert finding.severity == Severity.ERROR and finding.layer == "3"


def test_bce_on_the_same_saturated_output_is_silent() -> None:
    assert scan(head(bias=8.0), batch(), bce) == []
    assert scan(head(bias=8.0, outputs=10), batch(10), bce) == []


def test_partly_saturated_output_under_the_automatic_loss_is_silent() -> None:
    x, _ = batch()
    y = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(3))
    assert scan(head(scale=16.0, outputs=10), (x, y)) == []


def test_without_a_backward_the_output_is_not_judged() -> None:
    model = head(bias=8.0)
    model.requires_grad_(False)  # no trainable parameter: no backward, no gradient
    assert scan(model, batch(), mse) == []


def test_a_hidden_sigmoid_is_judged_without_gradients_too() -> None:
    """The exemption is the output's only: a saturated hidden sigmoid still fires."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Sigmoid(), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].bias.fill_(8.0)
    model.requires_grad_(False)
    (finding,) = scan(model, batch(), mse)
    assert finding.layer == "1" and "loss_sensitivity" not in finding.evidence


def test_what_if_resolves_the_output_finding() -> None:
    report = nnhealth.scan(head(bias=8.0), batch(), mse, select=["NH102"], what_if=True)
    (tried,) = [w for w in report.what_if if w["code"] == "NH102"]
    assert tried["resolved"], tried


class TwoOutputs(nn.Module):
    """A classifier returning (logits, sigmoid(logits)) or the reverse, logits near +8."""

    def __init__(self, probs_first: bool = False) -> None:
        super().__init__()
        self.model = head(bias=8.0, outputs=10)[:3]
        self.probs_first = probs_first

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model(x)
        return (torch.sigmoid(z), z) if self.probs_first else (z, torch.sigmoid(z))


def test_probabilities_beside_the_logits_the_loss_uses_are_silent() -> None:
    x, _ = batch()
    y = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(3))
    assert scan(TwoOutputs(), (x, y)) == []  # cross-entropy on the logits


def test_the_same_probabilities_under_mse_fire() -> None:
    x, t = batch(10)
    (finding,) = scan(TwoOutputs(probs_first=True), (x, t), lambda out, t: mse(out[0], t))
    assert finding.severity == Severity.ERROR and finding.layer == "(root):sigmoid"
