"""Every captured statistic against a direct computation on a small case.

Tolerances: moments are float32 reductions (one pass, or centered two-pass where the
mean dominates) and agree with float64 references to 1e-5 relative; counts exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnhealth.capture.instrument import run_pass
from nnhealth.plan import Plan

RTOL = 1e-5
# saturated where the derivative is under 5% of its peak (the thresholds below)
PLAN = Plan(dead_units=True, saturation_derivative=0.05)


class Tiny(nn.Module):
    """Linear -> ReLU -> Linear -> tanh -> Linear -> sigmoid-ish head, all observable."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 7)
        self.fc3 = nn.Linear(7, 4)
        with torch.no_grad():
            self.fc1.bias[:3] = -50.0  # three dead units
            self.fc2.weight.mul_(6.0)  # push tanh into saturation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


def reference(model: Tiny, x: torch.Tensor, y: torch.Tensor):
    """The same forward with every intermediate kept, and its gradients."""
    h1 = model.fc1(x)
    a1 = F.relu(h1)
    h2 = model.fc2(a1)
    a2 = torch.tanh(h2)
    out = model.fc3(a2)
    for t in (h1, a1, h2, a2, out):
        t.retain_grad()
    loss = F.cross_entropy(out, y)
    loss.backward()
    return {"fc1": h1, "fc1:relu": a1, "fc2": h2, "fc2:relu": a2, "fc3": out}, loss


@pytest.fixture
def captured():
    model = Tiny()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))
    cap = run_pass(model, x, lambda out: F.cross_entropy(out, y), PLAN, examples=32)
    ref_model = Tiny()
    tensors, loss = reference(ref_model, x, y)
    return cap, tensors, loss, ref_model


def site(cap, name):
    return next(s for s in cap.sites if s.name == name)


def test_site_names_and_order(captured) -> None:
    cap, *_ = captured
    assert [(s.name, s.kind, s.role) for s in cap.sites] == [
        ("fc1", "Linear", "layer"),
        ("(root):relu", "relu", "activation"),
        ("fc2", "Linear", "layer"),
        ("(root):tanh", "tanh", "activation"),
        ("fc3", "Linear", "layer"),
    ]


@pytest.mark.parametrize(
    "name,ref",
    [
        ("fc1", "fc1"),
        ("(root):relu", "fc1:relu"),
        ("fc2", "fc2"),
        ("(root):tanh", "fc2:relu"),
        ("fc3", "fc3"),
    ],
)
def test_moments_match_direct_computation(captured, name: str, ref: str) -> None:
    cap, tensors, _, _ = captured
    s, t = site(cap, name), tensors[ref].detach().double()
    assert s.units == t.shape[1] and s.per_unit_count == t.shape[0]
    assert s.mean == pytest.approx(float(t.mean()), rel=RTOL, abs=1e-9)
    assert s.var == pytest.approx(float(t.var(unbiased=False)), rel=RTOL)
    g = tensors[ref].grad.double()
    assert s.grad_var == pytest.approx(float(g.var(unbiased=False)), rel=RTOL)
    assert s.grad_count == g.numel()


def test_dead_units_counted_per_unit(captured) -> None:
    cap, tensors, _, _ = captured
    s = site(cap, "(root):relu")
    a = tensors["fc1:relu"].detach()
    np.testing.assert_array_equal(s.ever_active, ((a > 0).sum(0) > 0).numpy())
    assert s.dead_units == int(((a > 0).sum(0) == 0).sum()) >= 3


def test_saturation_counts_and_mean_derivative(captured) -> None:
    cap, tensors, _, _ = captured
    s = site(cap, "(root):tanh")
    a = tensors["fc2:relu"].detach().double()
    threshold = math.sqrt(1 - 0.05)  # derivative 1 - y^2 under 5% of its peak
    expected = (a.abs() >= threshold).sum(0).numpy()
    np.testing.assert_array_equal(s.saturated_count, expected)
    assert s.saturated_fraction_values == pytest.approx(
        float((a.abs() >= threshold).double().mean())
    )
    assert s.mean_derivative == pytest.approx(float((1 - a**2).mean()), rel=RTOL)
    stuck = int(((a.abs() >= threshold).double().mean(0) >= 0.9).sum())
    assert s.saturated_units(0.9) == stuck


def test_sigmoid_mean_derivative_and_bounds() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.Sigmoid(), nn.Linear(9, 2))
    with torch.no_grad():
        model[0].weight.mul_(8)
    x = torch.randn(40, 5)
    cap = run_pass(model, x, lambda o: o.square().mean(), PLAN, examples=40)
    s = site(cap, "1")
    y = torch.sigmoid(model[0](x)).detach().double()
    assert s.mean_derivative == pytest.approx(float((y * (1 - y)).mean()), rel=RTOL)
    h = 0.5 * math.sqrt(1 - 0.05)  # y(1-y) < 0.05 * 0.25
    expected = ((y <= 0.5 - h) | (y >= 0.5 + h)).sum(0).numpy()
    np.testing.assert_array_equal(s.saturated_count, expected)


def test_param_norms_and_grad_norms(captured) -> None:
    cap, _, _, ref_model = captured
    by_name = {p.name: p for p in cap.params}
    for name, p in ref_model.named_parameters():
        assert by_name[name].norm == pytest.approx(float(p.detach().double().norm()), rel=1e-6)
        assert by_name[name].grad_norm == pytest.approx(float(p.grad.double().norm()), rel=1e-5)
    assert by_name["fc1.weight"].role == "weight"
    assert by_name["fc1.bias"].role == "bias"


def test_loss_value(captured) -> None:
    cap, _, loss, _ = captured
    assert cap.loss == pytest.approx(float(loss.detach()), rel=1e-6)


def test_conv_statistics_are_per_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 36, 3)
    )
    with torch.no_grad():
        model[0].bias[1] = -100.0  # channel 1 dead at every position
    x = torch.randn(10, 3, 6, 6)
    cap = run_pass(model, x, lambda o: o.square().mean(), PLAN, examples=10)
    relu = site(cap, "1")
    a = F.relu(model[0](x)).detach().double()
    assert relu.unit_dim == 1 and relu.units == 5 and relu.per_unit_count == 10 * 36
    assert relu.mean == pytest.approx(float(a.mean()), rel=RTOL)
    assert relu.var == pytest.approx(float(a.var(unbiased=False)), rel=RTOL)
    np.testing.assert_array_equal(relu.ever_active, ((a > 0).sum((0, 2, 3)) > 0).numpy())
    assert relu.dead_units == 1


def test_small_variance_around_large_mean_is_accurate() -> None:
    """The centered two-pass method avoids E[x^2] - E[x]^2 cancellation in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6))
    with torch.no_grad():
        model[0].weight.mul_(1e-4)
        model[0].bias.fill_(1000.0)
    x = torch.randn(256, 4)
    cap = run_pass(model, x, lambda o: o.mean(), PLAN, examples=256)
    y = model[0](x).detach().double()
    assert site(cap, "0").var == pytest.approx(float(y.var(unbiased=False)), rel=1e-3)


def test_nonfinite_counted_exactly() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[2, 1] = float("inf")
        model[2].weight[0, 0] = float("nan")
    x = torch.randn(8, 4)
    cap = run_pass(model, x, lambda o: o.square().mean(), PLAN, examples=8)
    first = site(cap, "0")
    assert first.nonfinite == int((~torch.isfinite(model[0](x))).sum())
    params = {p.name: p for p in cap.params}
    assert params["0.weight"].nonfinite == 1
    assert params["2.weight"].nonfinite == 1
    assert params["0.bias"].nonfinite == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_float64_reductions_span_blocks_and_leave_the_tensor(dtype: torch.dtype) -> None:
    """moments64 and norm64 read a tensor a block at a time through one float64 buffer
    (changed in place): over several blocks and a short last one they agree with numpy's
    float64 to 1e-12, and the tensor itself is unchanged."""
    from nnhealth.capture import precision

    n = 2 * precision._CHUNK + 12345
    t = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.05 + 3.0).to(dtype)
    before = t.clone()
    a = t.double().numpy()
    mean, var = precision.moments64(t)
    assert mean == pytest.approx(a.mean(), rel=1e-12)
    assert var == pytest.approx(((a - a.mean()) ** 2).mean(), rel=1e-12)
    assert precision.norm64(t) == pytest.approx(np.sqrt(np.dot(a, a)), rel=1e-12)
    assert torch.equal(t, before)
