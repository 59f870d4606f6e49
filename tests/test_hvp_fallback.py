"""--hessian must not cost the report: when the double backward cannot be had (an op
without a second derivative, hardsigmoid) or trusted (@once_differentiable), NH401 takes
Hessian-vector products by central differences of gradients, states the error bar and
does not call it certified; when that fails too, NH401 is skipped with both reasons.

Ground truth: the dense Hessian (torch.func.jacrev of torch.func.grad, float64) of a
smooth twin: hardsigmoid is x/6 + 1/2 on (-3, 3), where every pre-activation of the
test batch lies (asserted, with a margin far beyond the step), and the custom softplus
is F.softplus.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SoftplusOnce, dense_hessian, softplus_mlp
from conftest import softplus_batch as batch
from torch import nn
from torch.func import functional_call, grad, jacrev

import nnhealth
from nnhealth.curvature.finite import FiniteDifferenceOperator, relative_step
from nnhealth.curvature.measure import measure


class Linearized(nn.Module):
    """hardsigmoid on (-3, 3), with a second derivative (zero)."""

    def forward(self, x):
        assert bool((x.abs() < 2.5).all())  # inside the linear piece, far from the kinks
        return x / 6 + 0.5


def hardsigmoid_mlp(act: type[nn.Module] = nn.Hardsigmoid, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 3)).to(
        dtype
    )


def dense_lambda_max(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(np.linalg.eigvalsh(dense_hessian(model.double(), x.double(), y))[-1])


def fd_note(report) -> str:
    (note,) = [n for n in report.notes if "central differences of gradients" in n]
    return note


# -- the fallback against the dense Hessian ----------------------------------------------


def tol_kwargs(tol: float | None) -> dict[str, float]:
    """None: the scan's default --hessian-tol (1e-2)."""
    return {} if tol is None else {"hessian_tol": tol}


def assert_error_bar(c: dict, truth: float) -> None:
    """The stated bar holds against the dense Hessian and is within the tolerance
    (products' error included, measured < 1e-9 here: 10% slack); the true error lies far
    below it: measured <= 5.2e-5 relative at 1e-2 and <= 1.6e-7 at 1e-3, asserted <= tol/10."""
    lam, bar = c["top_eigenvalues"][0], c["lambda_max_error"]
    assert abs(lam - truth) <= bar <= 1.1 * c["tol"] * truth
    assert abs(lam - truth) <= c["tol"] / 10 * truth


@pytest.mark.parametrize("tol", [None, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_hardsigmoid_mlp_gets_lambda_max_by_finite_differences(dtype, tol) -> None:
    x, y = batch(dtype)
    truth = dense_lambda_max(hardsigmoid_mlp(Linearized, dtype), x, y)
    report = nnhealth.scan(
        hardsigmoid_mlp(dtype=dtype),
        (x, y),
        select=["NH401", "NH101"],
        hessian=True,
        **tol_kwargs(tol),
    )
    c = report.curvature
    assert not report.skipped and c["hvp"] == "finite-difference" and c["certified"] is False
    assert c["tol"] == (tol or 1e-2)
    assert_error_bar(c, truth)
    bar = c["lambda_max_error"]
    assert c["hvp_error"] < 1e-4  # products on the float64 copy
    assert "hardsigmoid" in fd_note(report) and "not certified" in fd_note(report)
    (finding,) = [f for f in report.findings if f.code == "NH401"]
    assert "not certified" in finding.message and f"± {bar:.2g}" in finding.message
    assert finding.evidence["certified"] is False
    assert finding.evidence["lambda_max_error"] == bar


@pytest.mark.parametrize("tol", [None, 1e-3])
def test_a_once_differentiable_function_gets_lambda_max_by_finite_differences(tol) -> None:
    x, y = batch(torch.float32)
    truth = dense_lambda_max(softplus_mlp(None, torch.float32), x, y)
    report = nnhealth.scan(
        softplus_mlp(SoftplusOnce, torch.float32),
        (x, y),
        select=["NH401", "NH101"],
        hessian=True,
        **tol_kwargs(tol),
    )
    c = report.curvature
    assert c["hvp"] == "finite-difference" and not report.skipped
    assert c["tol"] == (tol or 1e-2)
    assert_error_bar(c, truth)
    assert "SoftplusOnce (layers '1', '3' [Act]) is marked @once_differentiable" in fd_note(report)


def test_the_products_error_matches_the_truth_and_the_model_of_scales() -> None:
    """One product against the dense Hessian: the calibrated step's error is at most the
    stated estimate, and, on this smooth loss, near (3u)^(2/3)/2 for float64."""
    x, y = batch(torch.float64)
    model = softplus_mlp(SoftplusOnce, torch.float64)
    names = [n for n, _ in model.named_parameters()]
    twin = softplus_mlp(None, torch.float64)
    flat0 = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
    shapes = [p.shape for p in twin.parameters()]

    def loss(flat):
        params, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = flat[offset : offset + math.prod(s)].view(s)
            offset += math.prod(s)
        return F.cross_entropy(functional_call(twin, params, (x,)), y)

    h = jacrev(grad(loss))(flat0).detach()
    v = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v /= v.norm()
    with FiniteDifferenceOperator(model, x, lambda o: F.cross_entropy(o, y)) as op:
        d = op.matvec(v)
        error = float((d - h @ v).norm() / (h @ v).norm())
        assert error <= op.calibration_error
        assert op.relative == pytest.approx(relative_step(torch.float64))  # e0 was kept
    assert error < 100 * relative_step(torch.float64) ** 2


# -- the exact path when it works --------------------------------------------------------


def test_the_exact_path_is_kept_when_double_backward_works() -> None:
    x, y = batch(torch.float64)
    truth = dense_lambda_max(softplus_mlp(None, torch.float32), x, y)
    stats, notes = measure(
        softplus_mlp(None, torch.float64), x, lambda o: F.cross_entropy(o, y), tol=1e-8, budget=200
    )
    assert stats.hvp == "double-backward" and stats.certified and stats.hvp_error is None
    assert stats.top[0] == pytest.approx(truth, rel=1e-8)
    assert stats.lambda_max_error == stats.bounds[0]
    assert stats.hvps == stats.lanczos_hvps + 2  # as before: the symmetry test's two
    assert not any("central differences" in n for n in notes)


# -- the model as found --------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 16)
        self.bn = nn.BatchNorm1d(16)
        self.act = nn.Hardsigmoid()
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 3)
        self.frozen = nn.Linear(3, 3)

    def forward(self, x):
        return self.frozen(self.fc2(self.drop(self.act(self.bn(self.fc1(x))))))


def test_the_model_is_left_exactly_as_found() -> None:
    torch.manual_seed(0)
    model = Mixed()
    model.frozen.requires_grad_(False)
    model.drop.eval()  # a mixed mode, to be restored module by module
    x, y = batch(torch.float32)
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grad_before = model.fc1.weight.grad
    versions = [p._version for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    report = nnhealth.scan(model, (x, y), select=["NH401"], hessian=True, mode="train")
    assert report.curvature["hvp"] == "finite-difference"
    for k, v in model.state_dict().items():  # parameters and BatchNorm statistics
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p._version for p in model.parameters()] == versions  # never written in place
    assert model.fc1.weight.grad is grad_before and bool((grad_before == 7).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc1.weight")
    assert not any(p.requires_grad for p in model.frozen.parameters())
    assert model.fc2.weight.requires_grad


# -- when finite differences fail too ------------------------------------------------------


class Kinked(nn.Module):
    """hardsigmoid (no second derivative), and a ReLU unit whose input is exactly zero
    for every example: the gradient jumps at the weights themselves, on every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(5, 8)
        with torch.no_grad():
            self.fc1.weight[0] = 0.0
            self.fc1.bias[0] = 0.0
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.cat([F.relu(h[:, :1]), F.hardsigmoid(h[:, 1:])], 1))


def test_a_loss_finite_differences_cannot_resolve_skips_nh401_with_both_reasons() -> None:
    x, y = batch(torch.float32)
    report = nnhealth.scan(Kinked(), (x, y), select=["NH401", "NH101"], hessian=True)
    (skip,) = [s for s in report.skipped if s.code == "NH401"]
    assert report.curvature is None and "NH101" in report.run["checks"]  # the rest ran
    assert "hardsigmoid" in skip.reason
    assert "finite differences of gradients failed too" in skip.reason
    assert "do not settle" in skip.reason and "\n" not in skip.reason


# -- the model that showed it: mobilenet_v3_small ------------------------------------------


def test_mobilenet_v3_small_gets_nh401_by_finite_differences(tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    from typer.testing import CliRunner

    from nnhealth.cli import app

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    path = tmp_path / "mnv3.pt"
    torch.save(model, path)
    result = CliRunner().invoke(
        app,
        [
            "scan",
            str(path),
            "--trust",
            "--input-shape",
            "4x3x32x32",
            "--hessian",
            "--mode",
            "eval",
            "--hessian-budget",
            "20",
            "--format",
            "json",
        ],
    )
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert report["curvature"]["hvp"] == "finite-difference"
    assert report["curvature"]["certified"] is False
    assert any(f["code"] == "NH401" for f in report["findings"])
    assert not any(e for e in report["errors"])
