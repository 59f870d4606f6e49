"""The plan: the selected checks' needs and requests merged, and a pass that computes
what the plan asks for and nothing else."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnhealth
from nnhealth.analyzers import REGISTRY, lookup
from nnhealth.capture import reducers
from nnhealth.capture.instrument import run_pass
from nnhealth.errors import CaptureError
from nnhealth.options import ScanOptions
from nnhealth.plan import Hessian, Plan, Request, is_opt_in, make_plan


def plan_of(*codes: str, **options) -> Plan:
    checks = [lookup(code) for code in codes]
    return make_plan([(c, c.defaults()) for c in checks], ScanOptions(**options))


def shape(plan: Plan) -> tuple:
    return (
        plan.forward,
        plan.activations,
        plan.gradients,
        plan.dead_units,
        plan.saturation_derivative,
        plan.fingerprints,
        plan.symmetry_rtol,
        plan.curvature,
    )


# each check alone:
# (forward, activations, gradients, dead units, saturation, fingerprints, rtol, hessian)
ALONE = {
    "NH001": (True, True, True, False, None, False, None, None),
    "NH101": (True, True, False, True, None, False, None, None),
    # NH102 uses the gradient: whether the loss undoes a saturated output nonlinearity
    "NH102": (True, True, True, False, 0.05, False, None, None),
    "NH201": (True, True, False, False, None, False, None, None),
    "NH202": (True, True, True, False, None, False, None, None),
    "NH301": (True, False, True, False, None, False, None, None),
    "NH401": (True, False, False, False, None, False, None, Hessian()),
    "NH501": (True, True, False, False, None, True, 1e-6, None),
    "NH601": (True, True, True, False, None, False, None, None),
}


@pytest.mark.parametrize("code", sorted(ALONE))
def test_plan_of_each_check_alone(code: str) -> None:
    assert shape(plan_of(code)) == ALONE[code]


def test_plan_of_combinations() -> None:
    assert shape(plan_of("NH101", "NH102")) == (True, True, True, True, 0.05, False, None, None)
    assert shape(plan_of("NH101", "NH301")) == (True, True, True, True, None, False, None, None)
    assert shape(plan_of("NH102", "NH501")) == (True, True, True, False, 0.05, True, 1e-6, None)
    every = plan_of(*ALONE)
    assert shape(every) == (True, True, True, True, 0.05, True, 1e-6, Hessian())


def test_no_check_needs_a_pass() -> None:
    assert not plan_of().forward and not plan_of().activations


def test_check_options_reach_the_plan() -> None:
    saturation, symmetry = lookup("NH102"), lookup("NH501")
    checks = [
        (saturation, saturation.resolve_options({"derivative_fraction": 0.2})),
        (symmetry, symmetry.resolve_options({"rtol": 1e-3})),
    ]
    plan = make_plan(checks, ScanOptions())
    assert (plan.saturation_derivative, plan.symmetry_rtol) == (0.2, 1e-3)


def test_hessian_settings_and_no_hessian() -> None:
    plan = plan_of(
        "NH401",
        hessian_top=3,
        hessian_min=True,
        hessian_trace=4,
        hessian_tol=1e-4,
        hessian_budget=50,
        mode="eval",
        seed=7,
    )
    assert plan.curvature == Hessian(top=3, smallest=True, trace_probes=4, tol=1e-4, budget=50)
    assert (plan.mode, plan.seed) == ("eval", 7)
    off = plan_of("NH401", hessian=False)
    assert off.curvature is None and off.forward  # the check is skipped with the reason
    assert plan_of("NH101", hessian=True).curvature is None  # nobody asked


def test_requests_merge() -> None:
    a = Request(saturation_derivative=0.05)
    b = Request(fingerprints=True, symmetry_rtol=1e-6)
    assert a.merge(b) == Request(saturation_derivative=0.05, fingerprints=True, symmetry_rtol=1e-6)
    assert a.merge(a) == a and Request().merge(Request(curvature=True)).curvature
    with pytest.raises(ValueError, match="saturation_derivative 0.05 and 0.1"):
        a.merge(Request(saturation_derivative=0.1))


class _Expensive:
    """Not a registered check: what makes a check opt-in is its request."""

    @staticmethod
    def defaults() -> dict:
        return {"depth": 1}

    @staticmethod
    def request(options: dict) -> Request:
        return Request(curvature=options["depth"] > 0)


def test_opt_in_comes_from_the_request() -> None:
    assert is_opt_in(_Expensive)
    assert [c.code for c in REGISTRY if is_opt_in(c)] == ["NH401"]


def test_default_selection_leaves_the_opt_in_check_out() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    assert "NH401" not in nnhealth.scan(model, (x, y)).run["checks"]
    assert "NH401" in nnhealth.scan(model, (x, y), hessian=True).run["checks"]


# ---- the pass computes what the plan asks for, nothing else ------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


def loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


class Spy:
    """Counts calls of a reducers.py function while it still computes."""

    def __init__(self, monkeypatch, name: str) -> None:
        self.calls = 0
        real = getattr(reducers, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(reducers, name, spy)


def test_without_saturation_no_counts_are_computed(monkeypatch) -> None:
    spy = Spy(monkeypatch, "_count_saturated")
    cap = run_pass(Net(), torch.randn(10, 6), loss, plan_of("NH101", "NH201"), examples=10)
    tanh = next(s for s in cap.activation_sites() if s.kind == "tanh")
    assert spy.calls == 0 and tanh.saturated_count is None and tanh.mean_derivative is not None
    relu = next(s for s in cap.activation_sites() if s.kind == "relu")
    assert relu.ever_active is not None  # NH101 asked for dead units
    cap = run_pass(Net(), torch.randn(10, 6), loss, plan_of("NH102"), examples=10)
    assert spy.calls == 1
    assert next(s for s in cap.activation_sites() if s.kind == "tanh").saturated_count is not None
    relu = next(s for s in cap.activation_sites() if s.kind == "relu")
    assert relu.ever_active is None  # nobody asked for dead units


def test_without_symmetry_no_fingerprints(monkeypatch) -> None:
    spy = Spy(monkeypatch, "_unit_projection")
    cap = run_pass(Net(), torch.randn(10, 6), loss, plan_of("NH101", "NH102"), examples=10)
    assert spy.calls == 0
    assert all(s.unit_fingerprint is None for s in cap.sites)
    cap = run_pass(Net(), torch.randn(10, 6), loss, plan_of("NH501"), examples=10)
    assert spy.calls == 2  # the two nonlinearities, not the layers
    assert [s.unit_fingerprint is not None for s in cap.sites] == [
        s.role == "activation" for s in cap.sites
    ]


class _BrokenBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward ran")


class BrokenNet(Net):
    """A backward through it raises: fc1's gradient must pass its Function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _BrokenBackward.apply(self.fc1(x))
        return self.fc3(torch.tanh(self.fc2(F.relu(h))))


@pytest.mark.parametrize("codes", [("NH101",), ("NH201", "NH501")])
def test_without_a_gradient_check_no_backward(codes: tuple[str, ...]) -> None:
    model, x = BrokenNet(), torch.randn(10, 6)
    cap = run_pass(model, x, loss, plan_of(*codes), examples=10)
    assert not cap.has_gradients
    assert all(s.grad_count == 0 and s.grad_var is None for s in cap.sites)
    assert all(p.grad_norm is None for p in cap.params)
    with pytest.raises(CaptureError, match="backward ran"):
        run_pass(model, x, loss, plan_of(*codes, "NH202"), examples=10)


def test_gradients_without_activations() -> None:
    cap = run_pass(Net(), torch.randn(10, 6), loss, plan_of("NH301"), examples=10)
    assert cap.sites == () and not cap.has_activations
    assert cap.has_gradients and all(p.grad_norm is not None for p in cap.params)


def test_the_plans_mode_and_seed() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 2))
    x = torch.randn(10, 6)
    plan = plan_of("NH201")
    a = run_pass(model, x, loss, replace(plan, seed=3), examples=10)
    b = run_pass(model, x, loss, replace(plan, seed=3), examples=10)
    c = run_pass(model, x, loss, replace(plan, seed=4), examples=10)
    off = run_pass(model, x, loss, replace(plan, mode="eval"), examples=10)
    assert a.loss == b.loss != c.loss and off.mode == "eval" and a.mode == "train"


def test_layer_table_columns_follow_the_selection() -> None:
    model = Net()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    rows = {r["name"]: r for r in nnhealth.scan(model, (x, y), select=["NH201"]).layers}
    assert "saturated_fraction" not in rows["(root):tanh"]
    assert "dead_fraction" not in rows["(root):relu"]
    rows = {r["name"]: r for r in nnhealth.scan(model, (x, y), select=["NH1"]).layers}
    assert "saturated_fraction" in rows["(root):tanh"]
    assert "dead_fraction" in rows["(root):relu"]
