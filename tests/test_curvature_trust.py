"""NH401 must not certify a wrong operator, and must not crash on user code.

Ground truth: the dense Hessian by reverse-over-reverse autodiff (torch.func.jacrev of
torch.func.grad) of the same network written with the built-in op, and numpy's
eigvalsh, all in float64. A custom autograd Function with a broken second derivative
(marked @once_differentiable, or a backward that detaches what it gets) makes Lanczos
converge, with a small certified bound, to the wrong lambda_max; the scan must refuse
(naming the Function and its layer, and taking the products by finite differences of
gradients instead: tests/test_hvp_fallback.py). Healthy
operators must pass the symmetry test with a wide margin (asserted below 10x the
products' rounding error, against a refusal at SYMMETRY_TOL = 50x).
"""

from __future__ import annotations

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
from nnhealth.curvature import trust
from nnhealth.curvature.hvp import HessianOperator, NoCurvature
from nnhealth.curvature.lanczos import lanczos, start_vector
from nnhealth.curvature.measure import measure, scan_lanczos

# -- custom activations: softplus with a hand-written backward ---------------------------


class SoftplusDetachedGrad(SoftplusOnce):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.detach() * torch.sigmoid(x)


class SoftplusNoGrad(SoftplusOnce):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return g * torch.sigmoid(x)


class SoftplusDetachedInput(SoftplusOnce):
    """Differentiates through g but not through x: symmetric, and wrong (the softplus''
    term is missing). On the graph it looks like a linear Function; re-running it on a
    moved input tells them apart."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x.detach())


def true_lambda_max() -> float:
    x, y = batch()
    return float(np.linalg.eigvalsh(dense_hessian(softplus_mlp(), x, y))[-1])


def fallback_reason(report) -> str:
    """Why the double backward was refused: now a note, NH401 measured by finite
    differences of gradients (tests/test_hvp_fallback.py checks their values)."""
    assert not report.skipped and report.curvature["hvp"] == "finite-difference"
    (note,) = [n for n in report.notes if "central differences of gradients" in n]
    return note


def skip_reason(report) -> str:
    (skip,) = [s for s in report.skipped if s.code == "NH401"]
    assert report.curvature is None and "NH101" in report.run["checks"]  # the rest ran
    return skip.reason


# -- 1. a broken second derivative: reproduced, then refused ----------------------------


@pytest.mark.parametrize("tol", [None, 1e-3])  # None: the scan's default, 1e-2
def test_without_the_checks_lanczos_certifies_a_wrong_lambda_max(monkeypatch, tol) -> None:
    """The bug: on the once_differentiable MLP, Lanczos converges with a bound of
    ~5e-3 (default) or ~1e-3 (tol 1e-3) to 1.6 where the dense Hessian says 1.95."""
    truth = true_lambda_max()
    x, y = batch()
    # the built-in softplus model: the operator is right (1e-8 relative)
    stats, _ = measure(softplus_mlp(), x, lambda o: F.cross_entropy(o, y), tol=1e-8, budget=200)
    assert stats.converged and stats.top[0] == pytest.approx(truth, rel=1e-8)
    monkeypatch.setattr(trust, "refusal", lambda functions: None)
    monkeypatch.setattr(trust, "SYMMETRY_TOL", math.inf)
    kwargs = {} if tol is None else {"tol": tol}
    stats, _ = measure(softplus_mlp(SoftplusOnce), x, lambda o: F.cross_entropy(o, y), **kwargs)
    assert stats.converged and stats.bounds[0] <= stats.tol * stats.top[0]
    assert abs(stats.top[0] - truth) > 0.15 * truth  # 1.60 against 1.95
    # the "certificate" is wrong: measured 46x the bound at 1e-2, over 100x at 1e-3
    assert abs(stats.top[0] - truth) > (20 if tol is None else 100) * stats.bounds[0]


@pytest.mark.parametrize(
    ("fn", "says"),
    [
        (SoftplusOnce, "is marked @once_differentiable"),
        (SoftplusDetachedGrad, "does not differentiate through the gradient it receives"),
        (SoftplusNoGrad, "does not differentiate through the gradient it receives"),
        (SoftplusDetachedInput, "changes with its input (re-run on a moved input)"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_broken_custom_backward_falls_back_naming_it(fn, says, dtype) -> None:
    x, y = batch(dtype)
    report = nnhealth.scan(softplus_mlp(fn, dtype), (x, y), select=["NH401", "NH101"], hessian=True)
    reason = fallback_reason(report)
    c = report.curvature
    truth = float(np.linalg.eigvalsh(dense_hessian(softplus_mlp(), x.double(), y))[-1])
    assert abs(c["top_eigenvalues"][0] - truth) <= c["lambda_max_error"]
    assert says in reason and f"{fn.__name__} (layers '1', '3' [Act])" in reason
    assert "\n" not in reason


@pytest.mark.parametrize("fn", [SoftplusOnce, SoftplusDetachedGrad, SoftplusNoGrad])
def test_the_symmetry_test_alone_refuses_them_too(monkeypatch, fn) -> None:
    """With the backward audit switched off, the symmetry test catches the same
    operators, in float32, by a wide margin, naming the Function."""
    monkeypatch.setattr(trust, "refusal", lambda functions: None)
    x, y = batch(torch.float32)
    model = softplus_mlp(fn, torch.float32)
    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y)) as op:
        with pytest.raises(NoCurvature, match="not symmetric") as info:
            scan_lanczos(op)
        assert op.products == 4  # Lanczos's start vector, two random ones, the rounding one
        sym = _symmetry(op)
    assert sym.asymmetry > 1e-2 and sym.asymmetry > 1e4 * sym.rounding
    assert f"{fn.__name__} (layers '1', '3' [Act])" in str(info.value)


def test_a_detached_saved_input_is_symmetric_and_wrong(monkeypatch) -> None:
    """Why the re-run exists: the symmetry test cannot see this one (S is rounding),
    and without the refusal Lanczos certifies 1.924 where the truth is 1.951."""
    truth = true_lambda_max()
    monkeypatch.setattr(trust, "refusal", lambda functions: None)
    x, y = batch()
    with HessianOperator(
        softplus_mlp(SoftplusDetachedInput), x, lambda o: F.cross_entropy(o, y)
    ) as op:
        assert _symmetry(op).asymmetry <= 10 * _symmetry(op).rounding
        res = scan_lanczos(op, tol=1e-8, budget=200)
    assert res.converged and abs(res.top[0].value - truth) > 1e-2 * truth
    assert abs(res.top[0].value - truth) > 1e4 * res.top[0].residual


def _symmetry(op: HessianOperator, seed: int = 0) -> trust.Symmetry:
    q0 = start_vector(op.n, op.gradient(), torch.Generator().manual_seed(seed), "cpu")
    return trust.check_symmetry(
        op.matvec, op.n, q0, op.matvec(q0), dtypes=[p.dtype for p in op.params], seed=seed
    )


def test_the_symmetry_statistic_measures_the_antisymmetric_part(monkeypatch) -> None:
    """S ~ |H - H^T|_F / (2 |H|_F): checked against the dense broken operator."""
    monkeypatch.setattr(trust, "refusal", lambda functions: None)
    x, y = batch()
    with HessianOperator(softplus_mlp(SoftplusOnce), x, lambda o: F.cross_entropy(o, y)) as op:
        h = torch.stack([op.matvec(e) for e in torch.eye(op.n, dtype=torch.float64)], 1)
        sym = _symmetry(op)
    ratio = float((h - h.T).norm() / (2 * h.norm()))
    assert 0.1 < ratio < 0.5
    assert ratio / 3 < sym.asymmetry < 3 * ratio


# -- healthy operators pass with margin -----------------------------------------------


class HandWrittenTanh(torch.autograd.Function):
    """tanh with a hand-written backward that is itself a custom Function with a right
    hand-written backward: a healthy custom operator (the symmetry test must pass, the
    value must match the dense Hessian). ``TanhGrad.fail`` makes the double backward
    raise on a given call."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return TanhGrad.apply(g, x)


class TanhGrad(torch.autograd.Function):
    calls = 0
    fail: tuple[int, BaseException] | None = None

    @staticmethod
    def forward(ctx, g, x):
        ctx.save_for_backward(g, x)
        return g * (1 - torch.tanh(x) ** 2)

    @staticmethod
    def backward(ctx, gg):
        TanhGrad.calls += 1
        if TanhGrad.fail is not None and TanhGrad.calls == TanhGrad.fail[0]:
            raise TanhGrad.fail[1]
        g, x = ctx.saved_tensors
        t = torch.tanh(x)
        d1 = 1 - t**2
        return gg * d1, gg * g * (-2 * t * d1)


class TanhAct(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        self.custom = custom

    def forward(self, x):
        return HandWrittenTanh.apply(x) if self.custom else torch.tanh(x)


def tanh_mlp(custom: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), TanhAct(custom), nn.Linear(8, 8), TanhAct(custom), nn.Linear(8, 3)
    ).double()


@pytest.fixture
def tanh_grad():
    TanhGrad.calls, TanhGrad.fail = 0, None
    yield TanhGrad
    TanhGrad.calls, TanhGrad.fail = 0, None


def test_a_right_hand_written_double_backward_is_certified(tanh_grad) -> None:
    x, y = batch()
    truth = float(np.linalg.eigvalsh(dense_hessian(tanh_mlp(False), x, y))[-1])
    report = nnhealth.scan(
        tanh_mlp(True), (x, y), select=["NH401"], hessian=True, hessian_tol=1e-8, hessian_budget=300
    )
    c = report.curvature
    assert c["converged"] and c["top_eigenvalues"][0] == pytest.approx(truth, rel=1e-7)
    assert not report.skipped and not any("custom autograd" in n for n in report.notes)
    assert c["hvps"] == c["lanczos_hvps"] + 2  # the symmetry test: two products more


def _healthy_models():
    def tanh_deep():
        layers, d = [], 32
        for _ in range(3):
            layers += [nn.Linear(d, 128), nn.Tanh()]
            d = 128
        return nn.Sequential(*layers, nn.Linear(128, 10)), (64, 32), 10

    def cnn_bn():
        return (
            nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
                nn.Linear(128, 10),
            ),
            (16, 3, 12, 12),
            10,
        )

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.encoder(x).mean(dim=1))

    return {
        "tanh-mlp": tanh_deep,
        "cnn-batchnorm": cnn_bn,
        "transformer-encoder": lambda: (Encoder(), (8, 6, 32), 5),
    }


@pytest.mark.parametrize("name", list(_healthy_models()))
@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_float32_operators_pass_the_symmetry_test_with_margin(name, seed) -> None:
    torch.manual_seed(seed)
    model, shape, classes = _healthy_models()[name]()
    x, y = torch.randn(*shape), torch.randint(0, classes, (shape[0],))
    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y)) as op:
        sym = _symmetry(op, seed)
    assert sym.symmetric and sym.asymmetry <= 10 * sym.rounding  # refused above 50x


def test_an_ill_conditioned_healthy_operator_is_not_refused() -> None:
    """Trained to a loss of ~3e-5, float32 products lose ~0.3% to cancellation: the
    symmetry test measures that rounding (one more product) instead of refusing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    opt = torch.optim.Adam(model.parameters(), 3e-2)
    for _ in range(300):  # to a loss of ~3e-5: products lose ~0.3% to cancellation
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y)) as op:
        sym = _symmetry(op)
        reference = op.matvec(torch.ones(op.n, dtype=torch.float64))
    with HessianOperator(model.double(), x.double(), lambda o: F.cross_entropy(o, y)) as op64:
        exact = op64.matvec(torch.ones(op64.n, dtype=torch.float64))
    assert float((reference - exact).norm() / exact.norm()) > 1e-4  # really ill-conditioned
    assert sym.products == 3 and sym.rounding > 1e-5
    assert sym.symmetric and sym.asymmetry <= 10 * sym.rounding


class TanhAndScale(torch.autograd.Function):
    """Two inputs, two outputs: (tanh(a), 3 b), with a right hand-written backward. The
    gradient reaching 3b is a constant when b feeds the loss linearly: b's result then
    rightly depends on that constant alone, not on the other (differentiable) gradient."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a)
        return torch.tanh(a), 3 * b

    @staticmethod
    def backward(ctx, g1, g2):
        (a,) = ctx.saved_tensors
        return g1 * (1 - torch.tanh(a) ** 2), 3 * g2


class TwoOutputs(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        self.custom = custom
        self.fa, self.fb, self.head = nn.Linear(5, 8), nn.Linear(5, 3), nn.Linear(8, 3)

    def forward(self, x):
        a, b = self.fa(x), self.fb(x)
        h, s = TanhAndScale.apply(a, b) if self.custom else (torch.tanh(a), 3 * b)
        return self.head(h), s


def test_a_multi_output_function_with_a_constant_gradient_is_not_refused() -> None:
    def loss(out, target):
        logits, s = out
        return F.cross_entropy(logits, target) + 0.1 * s.mean()

    def model(custom):
        torch.manual_seed(0)
        return TwoOutputs(custom).double()

    x, y = batch()
    reference = model(False)  # the dense truth, over the parameters with a second derivative
    names = ["fa.weight", "fa.bias", "head.weight", "head.bias"]
    params = dict(reference.named_parameters())

    def flat_loss(flat):
        values, offset = dict(params), 0
        for n in names:
            k = params[n].numel()
            values[n] = flat[offset : offset + k].view_as(params[n])
            offset += k
        return loss(functional_call(reference, values, (x,)), y)

    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    truth = float(np.linalg.eigvalsh(jacrev(grad(flat_loss))(flat0).detach().numpy())[-1])
    report = nnhealth.scan(
        model(True),
        (x, y),
        loss,
        select=["NH401"],
        hessian=True,
        hessian_tol=1e-8,
        hessian_budget=300,
    )
    assert report.curvature["top_eigenvalues"][0] == pytest.approx(truth, rel=1e-7)
    assert any("left out of the Hessian" in n for n in report.notes)  # fb: linear


# -- where the Function is -----------------------------------------------------------


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(SoftplusOnce.apply(self.fc1(x)))


def test_a_function_in_the_models_own_forward_or_in_the_loss_is_located() -> None:
    x, y = batch()
    torch.manual_seed(0)
    reason = fallback_reason(
        nnhealth.scan(FunctionalNet().double(), (x, y), select=["NH401", "NH101"], hessian=True)
    )
    assert "SoftplusOnce (the model's own forward [FunctionalNet])" in reason

    def loss(out, target):
        return F.cross_entropy(SoftplusOnce.apply(out), target)

    report = nnhealth.scan(softplus_mlp(), (x, y), loss, select=["NH401", "NH101"], hessian=True)
    assert "SoftplusOnce (the loss function)" in fallback_reason(report)


class StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class QuantAct(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        self.custom = custom

    def forward(self, x):
        x = torch.tanh(x)
        if self.custom:
            return StraightThroughRound.apply(x)
        return x + (torch.round(x * 4) / 4 - x).detach()  # the same straight-through


def test_a_straight_through_estimator_is_measured() -> None:
    """Its backward sees no tensor of the forward pass, so its second derivative is
    zero: the value matches the dense Hessian of the same estimator written with
    .detach(), with no note."""

    def model(custom):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), QuantAct(custom), nn.Linear(8, 3)).double()

    x, y = batch()
    truth = float(np.linalg.eigvalsh(dense_hessian(model(False), x, y))[-1])
    report = nnhealth.scan(
        model(True), (x, y), select=["NH401"], hessian=True, hessian_tol=1e-8, hessian_budget=300
    )
    assert report.curvature["top_eigenvalues"][0] == pytest.approx(truth, rel=1e-7)
    assert not report.skipped and not any("custom autograd" in n for n in report.notes)


class MaskedRelu(torch.autograd.Function):
    """A hand-written ReLU: its mask comes from the detached input. Piecewise linear,
    so its second derivative is zero (a.e.): re-running it on a moved input changes the
    result only where the move crosses zero."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.detach() > 0).to(g.dtype)


class SoftplusFromOutput(torch.autograd.Function):
    """Saves its output and detaches it: the input is not at hand to re-run it."""

    @staticmethod
    def forward(ctx, x):
        y = F.softplus(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - torch.exp(-y.detach()))


class FnAct(nn.Module):
    def __init__(self, fn=None, builtin=None) -> None:
        super().__init__()
        self.fn, self.builtin = fn, builtin

    def forward(self, x):
        return self.builtin(x) if self.fn is None else self.fn.apply(x)


def _fn_mlp(fn=None, builtin=None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 32),
        FnAct(fn, builtin),
        nn.Linear(32, 32),
        FnAct(fn, builtin),
        nn.Linear(32, 3),
    ).double()


def test_a_hand_written_relu_is_measured() -> None:
    x, y = batch()
    truth = float(np.linalg.eigvalsh(dense_hessian(_fn_mlp(builtin=torch.relu), x, y))[-1])
    report = nnhealth.scan(
        _fn_mlp(MaskedRelu),
        (x, y),
        select=["NH401"],
        hessian=True,
        hessian_tol=1e-8,
        hessian_budget=2000,
    )
    assert report.curvature["top_eigenvalues"][0] == pytest.approx(truth, rel=1e-7)
    assert not report.skipped and not any("custom autograd" in n for n in report.notes)


def test_a_backward_that_cannot_be_rerun_gets_a_note() -> None:
    x, y = batch()
    report = nnhealth.scan(_fn_mlp(SoftplusFromOutput), (x, y), select=["NH401"], hessian=True)
    assert report.curvature is not None  # measured, with the caveat said
    (note,) = [n for n in report.notes if "custom autograd Function" in n]
    assert "SoftplusFromOutput (layers '1', '3' [FnAct])" in note
    assert "takes its second derivative as zero" in note


# -- 2. no autograd path to the parameters --------------------------------------------


class DetachedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x).detach()


def test_a_detached_output_skips_nh401_and_the_rest_runs() -> None:
    x, y = batch(torch.float32)
    report = nnhealth.scan(DetachedOutput(), (x, y), select=["NH401", "NH101"], hessian=True)
    assert "does not depend on any trainable parameter through autograd" in skip_reason(report)
    # a loss computed without autograd: the same
    report = nnhealth.scan(
        softplus_mlp(dtype=torch.float32),
        (x, y),
        lambda out, target: F.cross_entropy(out.detach(), target),
        select=["NH401", "NH101"],
        hessian=True,
    )
    assert "does not depend on any trainable parameter" in skip_reason(report)


# -- 3. user code escaping while products are taken -------------------------------------


class Boom(BaseException):
    """Not an Exception: user code may raise one."""


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (ValueError("bad second derivative"), "raised ValueError: bad second derivative"),
        (SystemExit(3), "called sys.exit(3)"),
        (Boom("boom"), "raised Boom: boom"),
    ],
)
@pytest.mark.parametrize("at", [1, 2, 7])  # the first product, in the symmetry test, in Lanczos
def test_a_double_backward_that_raises_skips_nh401(tanh_grad, exc, says, at) -> None:
    x, y = batch()
    # two activations: each product calls TanhGrad.backward twice
    tanh_grad.fail = (2 * at, exc)
    report = nnhealth.scan(tanh_mlp(True), (x, y), select=["NH401", "NH101"], hessian=True)
    reason = skip_reason(report)
    assert reason.startswith(f"Hessian-vector product {at} {says} in TanhGrad.backward (")
    assert "test_curvature_trust.py:" in reason and "\n" not in reason


def test_ctrl_c_in_a_double_backward_propagates(tanh_grad) -> None:
    x, y = batch()
    tanh_grad.fail = (5, KeyboardInterrupt())
    model = tanh_mlp(True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyboardInterrupt):
        nnhealth.scan(model, (x, y), select=["NH401"], hessian=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class RaisesUnderCreateGraph(torch.autograd.Function):
    """Fine in the scan's plain backward; raises when asked for a differentiable one."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError("this backward is not differentiable")
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


def test_a_backward_that_raises_with_create_graph_falls_back() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(RaisesUnderCreateGraph.apply(self.fc1(x)))

    x, y = batch(torch.float32)
    reason = fallback_reason(nnhealth.scan(Net(), (x, y), select=["NH401", "NH101"], hessian=True))
    assert reason.startswith(
        "no exact Hessian-vector products here (the backward for Hessian products (with "
        "create_graph) raised RuntimeError: this "
        "backward is not differentiable in RaisesUnderCreateGraph.backward ("
    )
    assert "a custom autograd Function used in the model's own forward [Net]" in reason


class RaisingTwice(torch.autograd.Function):
    """What PyTorch does when a @once_differentiable result is differentiated where it
    cannot be pruned: its DelayedError node raises in the double backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return OnceRaising.apply(g, x)


class OnceRaising(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, x):
        return g * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, gg):
        raise RuntimeError(
            "trying to differentiate twice a function that was marked with @once_differentiable"
        )


def test_a_double_backward_raising_the_once_differentiable_error_falls_back() -> None:
    x, y = batch()
    reason = fallback_reason(
        nnhealth.scan(softplus_mlp(RaisingTwice), (x, y), select=["NH401", "NH101"], hessian=True)
    )
    assert reason.startswith(
        "no exact Hessian-vector products here (Hessian-vector product 1 failed: trying to "
        "differentiate twice a function that was "
        "marked with @once_differentiable: a custom autograd Function's backward "
        "(RaisingTwice (layers '1', '3' [Act])) has no second derivative"
    )


def test_pytorchs_own_once_differentiable_error_node_is_refused_before_any_product() -> None:
    """A backward whose result hangs on once_differentiable's error node (the node that
    raises "trying to differentiate twice") is refused from the graph alone."""
    from torch._C import _functions

    class Delayed(SoftplusOnce):
        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            err = _functions.DelayedError(
                b"trying to differentiate twice a function that was marked with "
                b"@once_differentiable",
                1,
            )
            return err(g * torch.sigmoid(x))

    x, y = batch()
    model = softplus_mlp(Delayed)
    with (
        pytest.raises(NoCurvature, match="Delayed .layers '1', '3' .Act.. is marked @once") as info,
        HessianOperator(model, x, lambda o: F.cross_entropy(o, y)),
    ):
        pass
    assert "\n" not in str(info.value)


def test_a_forward_that_fails_the_second_time_skips_nh401() -> None:
    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise SystemExit("only once")
            return self.fc(x)

    x, y = batch(torch.float32)
    reason = skip_reason(nnhealth.scan(Flaky(), (x, y), select=["NH401", "NH101"], hessian=True))
    assert reason.startswith(
        "the model's forward for Hessian products called sys.exit('only once') in "
    )
    assert "does the model keep state between calls, or need more examples" in reason


def test_an_op_without_a_second_derivative_falls_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Hardsigmoid(), nn.Linear(8, 3))
    x, y = batch(torch.float32)
    reason = fallback_reason(nnhealth.scan(model, (x, y), select=["NH401", "NH101"], hessian=True))
    assert "has no second derivative" in reason and "hardsigmoid" in reason


# -- 4. out of memory -----------------------------------------------------------------

_CPU_OOM = (
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8000000000 bytes. "
    "Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    "exc", [RuntimeError(_CPU_OOM), torch.OutOfMemoryError("CUDA out of memory."), MemoryError()]
)
def test_out_of_memory_in_a_product_skips_nh401(tanh_grad, exc) -> None:
    x, y = batch()
    tanh_grad.fail = (2 * 6, exc)
    reason = skip_reason(
        nnhealth.scan(tanh_mlp(True), (x, y), select=["NH401", "NH101"], hessian=True)
    )
    assert reason.startswith("out of memory in Hessian-vector product 6 (")
    assert "lower --hessian-budget" in reason and "more free memory" in reason
    assert "\n" not in reason


@pytest.mark.parametrize(
    "exc", [RuntimeError(_CPU_OOM), torch.OutOfMemoryError("CUDA out of memory."), MemoryError()]
)
def test_out_of_memory_for_the_lanczos_basis_skips_nh401(monkeypatch, exc) -> None:
    x, y = batch()
    model = softplus_mlp()
    n = sum(p.numel() for p in model.parameters())
    real_empty = torch.empty

    def failing_empty(*shape, **kwargs):
        sizes = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if len(sizes) == 2 and sizes[1] == n:
            raise exc
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", failing_empty)
    reason = skip_reason(nnhealth.scan(model, (x, y), select=["NH401", "NH101"], hessian=True))
    assert reason.startswith("out of memory during Lanczos (")
    assert "lower --hessian-budget" in reason and "\n" not in reason


def test_a_real_allocation_failure_in_lanczos_is_caught(monkeypatch) -> None:
    """No mock of the error: vectors the allocator really cannot give (2^60 bytes, more
    than any address space), on a stub operator of 2^57 parameters."""
    import nnhealth.curvature.measure as measure_module

    class Huge:
        def __init__(self) -> None:
            self.n, self.params, self.functions = 2**57, [torch.zeros(1)], []

        def gradient(self):
            return None

        def matvec(self, v):  # pragma: no cover - never reached
            raise AssertionError

    monkeypatch.setattr(measure_module, "available_memory", lambda device: None)  # unknown
    with pytest.raises(NoCurvature, match=r"^out of memory during Lanczos \(") as info:
        scan_lanczos(Huge())
    assert "lower --hessian-budget" in str(info.value)


def test_a_skip_reason_spells_options_as_the_rest_of_the_report(monkeypatch) -> None:
    """The reason comes from an error that names an option; in the report (API or CLI)
    it reads as the other reasons do, with the flag, and no marker leaks."""
    import nnhealth.curvature.measure as measure_module

    monkeypatch.setattr(measure_module, "available_memory", lambda device: 1000)
    x, y = batch()
    reason = skip_reason(
        nnhealth.scan(softplus_mlp(), (x, y), select=["NH401", "NH101"], hessian=True)
    )
    assert reason.startswith("not enough memory for Lanczos") and "leave out --hessian" in reason
    assert "\x02" not in reason and "\x03" not in reason


def test_lanczos_itself_does_not_need_the_checks() -> None:
    """The checks live in the scan's path; lanczos() stays a plain symmetric solver."""
    spectrum = np.linspace(1.0, 0.0, 50)
    d = torch.from_numpy(spectrum)
    res = lanczos(lambda v: d * v, 50, tol=1e-10, max_iter=50)
    assert res.converged and res.top[0].value == pytest.approx(1.0, rel=1e-10)
