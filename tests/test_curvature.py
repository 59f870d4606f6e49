"""Curvature (NH401) against the dense Hessian on small models.

Ground truth: the dense Hessian by reverse-over-reverse autodiff (torch.func.jacrev of
torch.func.grad: forward-over-reverse is wrong for LayerNorm/BatchNorm weights, see
DOMAIN.md) and numpy's eigvalsh, all in float64. Tolerances: products 1e-9 relative;
eigenvalues 1e-6 relative at --hessian-tol 1e-8.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import nnhealth
from nnhealth import memory as memory_module
from nnhealth.curvature.hvp import HessianOperator
from nnhealth.curvature.lanczos import NonFiniteProduct, _kept, lanczos, min_basis
from nnhealth.curvature.trace import hutchinson


def mlp_norms() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 6),
        nn.LayerNorm(6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


CASES = {
    "mlp-layernorm-batchnorm": (mlp_norms, (12, 5)),
    "cnn-batchnorm": (tiny_cnn, (6, 2, 5, 5)),
    "attention": (TinyAttention, (4, 3, 4)),
}


def setup(name: str):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = build().double().train()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    return model, x, y


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Reverse-over-reverse dense Hessian of the mean cross-entropy, dropout off."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, (nn.Dropout, nn.MultiheadAttention)):
            m.eval()
    torch.func.replace_all_batch_norm_modules_(ref)  # batch statistics, no buffer updates
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in ref.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in ref.named_parameters()])

    def loss(flat):
        params, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(np.prod(s))
            params[n] = flat[offset : offset + k].view(s)
            offset += k
        return F.cross_entropy(functional_call(ref, params, (x,)), y)

    with sdpa_kernel(SDPBackend.MATH):
        return jacrev(grad(loss))(flat0).detach().numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_products_match_the_dense_hessian(name: str) -> None:
    model, x, y = setup(name)
    h = dense_hessian(model, x, y)
    assert np.allclose(h, h.T, atol=1e-10)
    with HessianOperator(model, x, lambda out: F.cross_entropy(out, y)) as op:
        rng = np.random.default_rng(1)
        for _ in range(3):
            v = rng.standard_normal(op.n)
            hv = op.matvec(torch.from_numpy(v)).numpy()
            np.testing.assert_allclose(hv, h @ v, rtol=1e-9, atol=1e-11)
        if name == "attention":
            assert op.backend == "math attention"  # the fused CPU kernel has no 2nd derivative


@pytest.mark.parametrize("name", list(CASES))
def test_lanczos_matches_eigvalsh_and_eigsh(name: str) -> None:
    model, x, y = setup(name)
    exact = np.linalg.eigvalsh(dense_hessian(model, x, y))  # ascending
    with HessianOperator(model, x, lambda out: F.cross_entropy(out, y)) as op:
        res = lanczos(op.matvec, op.n, k=3, smallest=True, tol=1e-8, max_iter=op.n)
        assert res.converged
        top = [r.value for r in res.top]
        np.testing.assert_allclose(top, exact[::-1][:3], rtol=1e-6)
        assert res.bottom.value == pytest.approx(exact[0], rel=1e-6, abs=1e-6 * exact[-1])
        for r, true in zip(res.top, exact[::-1], strict=False):
            # the certified bound holds (up to the dense solver's own rounding)
            assert abs(r.value - true) <= r.residual + 1e-12 * abs(true)
        operator = sla.LinearOperator(
            (op.n, op.n),
            matvec=lambda v: op.matvec(torch.from_numpy(np.asarray(v).ravel())).numpy(),
            dtype=np.float64,
        )
        eigsh = sla.eigsh(operator, k=1, which="LA", tol=1e-10, return_eigenvectors=False)
        assert top[0] == pytest.approx(float(eigsh[0]), rel=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_the_default_tolerance_certifies_and_lands_far_inside(name: str) -> None:
    """A scan at the default --hessian-tol (1e-2) against the dense Hessian and against
    --hessian-tol 1e-3: each certified bound holds; the default's true error lies far
    inside its bound (measured 2e-5 to 2e-4 relative: asserted <= 1e-3) and it takes
    no more products (Lanczos takes at least 8; measured 10/10/11 against 10/13/14)."""
    model, x, y = setup(name)
    exact = float(np.linalg.eigvalsh(dense_hessian(model, x, y))[-1])
    runs = {
        tol: nnhealth.scan(model, (x, y), select=["NH401"], hessian=True, **kwargs).curvature
        for tol, kwargs in ((1e-2, {}), (1e-3, {"hessian_tol": 1e-3}))
    }
    for tol, c in runs.items():
        lam, bound = c["top_eigenvalues"][0], c["bounds"][0]
        assert c["converged"] and c["tol"] == tol and bound <= tol * lam
        assert abs(lam - exact) <= bound + 1e-12 * exact  # the certificate holds
        assert abs(lam - exact) <= tol / 10 * exact
    assert runs[1e-2]["hvps"] <= runs[1e-3]["hvps"]  # never later (the floor: 8 products)


def _diagonal(spectrum: np.ndarray):
    d = torch.from_numpy(np.ascontiguousarray(spectrum))
    return lambda v: d * v


def test_close_eigenvalues_are_not_declared_converged_early() -> None:
    """A diagonal operator with a close top pair: the Ritz gap overstates the true gap
    early on, so only the residual may certify convergence."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        spectrum = np.sort(rng.random(300))[::-1] * 10
        spectrum[1] = spectrum[0] * (1 - 1e-3)  # a close pair at the top
        res = lanczos(_diagonal(spectrum), 300, tol=1e-3, max_iter=300, seed=trial)
        top = res.top[0]
        # the certificate: some eigenvalue lies within the residual of the estimate...
        assert np.min(np.abs(spectrum - top.value)) <= top.residual * (1 + 1e-9)
        if res.converged:  # ...so lambda_max is within tol plus the width of the top pair
            assert abs(top.value - spectrum[0]) <= 1e-3 * spectrum[0] + (spectrum[0] - spectrum[1])


def test_budget_exhausted_is_a_result_not_an_error() -> None:
    model, x, y = setup("mlp-layernorm-batchnorm")
    report = nnhealth.scan(
        model, (x, y), select=["NH401"], hessian=True, hessian_budget=2, hessian_tol=1e-12
    )
    c = report.curvature
    assert c["converged"] is False and c["lanczos_hvps"] == 2 and c["bounds"][0] > 0
    (finding,) = report.findings
    assert "not converged in 2 products" in finding.message


def test_a_seed_orthogonal_to_the_top_eigenvector_still_finds_it() -> None:
    """The scan seeds Lanczos with the gradient; by a symmetry of the model the gradient
    can be orthogonal to the top eigenvector. A seed alone would then never see it (here
    the Krylov space of e_2 is e_2 itself); the random part that is always mixed in does."""
    spectrum = np.linspace(10.0, 1.0, 200)
    seed_vector = torch.zeros(200, dtype=torch.float64)
    seed_vector[1] = 1.0  # the eigenvector of lambda_2 = spectrum[1]
    res = lanczos(_diagonal(spectrum), 200, tol=1e-8, max_iter=200, start=seed_vector)
    assert res.converged
    assert res.top[0].value == pytest.approx(spectrum[0], rel=1e-8)


def test_a_seed_near_the_top_eigenvector_is_used() -> None:
    spectrum = np.linspace(10.0, 1.0, 500)
    spectrum[0] = 10.5
    op = _diagonal(spectrum)
    near = torch.full((500,), 1e-3, dtype=torch.float64)
    near[0] = 1.0
    random = lanczos(op, 500, tol=1e-6, max_iter=500)
    seeded = lanczos(op, 500, tol=1e-6, max_iter=500, start=near)
    assert random.converged and seeded.converged
    assert seeded.top[0].value == pytest.approx(10.5, rel=1e-6)
    assert seeded.iterations < random.iterations
    # a zero or non-finite seed is ignored (a purely random start), a wrong size refused
    for bad in (torch.zeros(500, dtype=torch.float64), torch.full((500,), float("nan"))):
        res = lanczos(op, 500, tol=1e-6, max_iter=500, start=bad)
        assert res.top[0].value == random.top[0].value
    with pytest.raises(ValueError, match="499 entries"):
        lanczos(op, 500, start=torch.ones(499))


def test_no_ghost_copies_over_many_steps() -> None:
    """Without full reorthogonalization Lanczos repeats converged eigenvalues ("ghosts")
    once it runs long past their convergence; with it the top-k are the distinct top-k."""
    spectrum = np.concatenate([[100.0, 50.0, 25.0], np.geomspace(10.0, 1e-6, 397)])
    res = lanczos(_diagonal(spectrum), 400, k=6, tol=1e-12, max_iter=400)
    assert res.converged
    np.testing.assert_allclose([r.value for r in res.top], spectrum[:6], rtol=1e-10)


def test_hutchinson_trace_against_exact() -> None:
    model, x, y = setup("cnn-batchnorm")
    exact = float(np.trace(dense_hessian(model, x, y)))
    with HessianOperator(model, x, lambda out: F.cross_entropy(out, y)) as op:
        est, se = hutchinson(op.matvec, op.n, probes=400)
    assert se > 0 and abs(est - exact) <= 4 * se


def _linear_regression():
    torch.manual_seed(0)
    model = nn.Linear(8, 2).double()
    x = torch.randn(64, 8, dtype=torch.float64) * torch.linspace(0.2, 3.0, 8, dtype=torch.float64)
    y = torch.randn(64, 2, dtype=torch.float64)
    return model, x, y


def _sgd_loss_change(model: nn.Module, x, y, lr: float, steps: int = 10) -> float:
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    start = float(F.mse_loss(model(x), y).detach())
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return float(F.mse_loss(model(x), y).detach()) - start


def test_lr_limit_predicts_sgd_divergence() -> None:
    model, x, y = _linear_regression()
    report = nnhealth.scan(model, (x, y), select=["NH401"], hessian=True)
    limit = report.curvature["lr_limit"]
    assert _sgd_loss_change(model, x, y, 1.5 * limit) > 0  # diverges
    assert _sgd_loss_change(model, x, y, 0.5 * limit) < 0  # converges
    (too_high,) = nnhealth.scan(
        model, (x, y), select=["NH401"], hessian=True, lr=1.5 * limit
    ).findings
    assert too_high.severity is nnhealth.Severity.ERROR and "diverges" in too_high.message
    (fine,) = nnhealth.scan(
        model, (x, y), select=["NH401"], hessian=True, lr=0.3 * limit
    ).findings or (None,)
    assert fine is None
    (info,) = report.findings
    assert info.severity is nnhealth.Severity.INFO and "2/lambda_max" in info.message


def test_model_left_as_found_and_mode_reported() -> None:
    model, x, y = setup("attention")
    model.eval()
    model.encoder.dropout.train()
    before = [m.training for m in model.modules()]
    buffers = [b.clone() for b in model.buffers()]
    report = nnhealth.scan(model, (x, y), select=["NH401"], hessian=True, mode="train")
    assert [m.training for m in model.modules()] == before
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert report.curvature["mode"] == "train" and report.curvature["backend"] == "math attention"
    assert any("math attention" in n for n in report.notes)
    assert any("dropout off" in n for n in report.notes)


def test_opt_in() -> None:
    model, x, y = setup("mlp-layernorm-batchnorm")
    default = nnhealth.scan(model, (x, y))
    assert default.curvature is None and "NH401" not in default.run["checks"]
    assert nnhealth.scan(model, (x, y), hessian=True).curvature is not None
    assert nnhealth.scan(model, (x, y), select=["curvature"]).curvature is not None
    off = nnhealth.scan(model, (x, y), select=["NH401"], hessian=False)
    assert off.curvature is None and "--no-hessian" in off.skipped[0].reason


def test_cli_hessian_json(cli, sample) -> None:
    import json

    model, data = sample("tanh_vanishing")
    res = cli(
        "scan",
        model,
        "--data",
        data,
        "--hessian",
        "--hessian-min",
        "--hessian-trace",
        "4",
        "--lr",
        "100",
        "--format",
        "json",
    )
    report = json.loads(res.out)
    c = report["curvature"]
    assert c["converged"] and c["lanczos_hvps"] <= 60
    assert c["hvps"] == c["lanczos_hvps"] + 4 + 2  # the trace's probes, the symmetry test's
    assert c["lr_limit"] == pytest.approx(2 / c["top_eigenvalues"][0])
    assert c["trace"] is not None and c["trace_stderr"] > 0 and c["lambda_min"] < 0
    nh401 = [f for f in report["findings"] if f["code"] == "NH401"]
    assert nh401[0]["severity"] == "error" and "diverges" in nh401[0]["message"]
    assert "Hessian" not in res.err or res.err == ""  # progress only on a terminal
    bad = cli("scan", model, "--data", data, "--hessian", "--hessian-tol", "2")
    assert bad.code == 2 and "--hessian-tol" in bad.err


class PartlyUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def test_unused_parameters_are_left_out_not_fatal() -> None:
    torch.manual_seed(0)
    model = PartlyUsed().double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    report = nnhealth.scan(
        model, (x, y), select=["NH401"], hessian=True, hessian_tol=1e-8, hessian_budget=200
    )
    used = nn.Sequential(model.fc, nn.Tanh(), model.head)
    exact = np.linalg.eigvalsh(dense_hessian(used, x, y))
    assert report.curvature["top_eigenvalues"][0] == pytest.approx(exact[-1], rel=1e-6)
    assert any("left out of the Hessian" in n for n in report.notes)


def test_frozen_model_skips_curvature_and_runs_the_rest() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).requires_grad_(False)
    report = nnhealth.scan(model, torch.randn(16, 4), hessian=True)
    assert report.curvature is None
    assert any(s.code == "NH401" and "no trainable parameters" in s.reason for s in report.skipped)
    assert "NH101" in report.run["checks"]


def test_progress_reports_steps_estimate_and_bound() -> None:
    from nnhealth.curvature.measure import measure

    model, x, y = setup("mlp-layernorm-batchnorm")
    seen: list[tuple[str, tuple[int, int] | None]] = []
    stats, _ = measure(
        model,
        x,
        lambda out: F.cross_entropy(out, y),
        budget=40,
        progress=lambda message, steps=None: seen.append((message, steps)),
    )
    steps = [s for _, s in seen if s is not None]
    assert steps == [(i, 40) for i in range(1, stats.lanczos_hvps + 1)]
    last = seen[-1][0]
    assert f"{stats.top[0]:.6g}" in last and f"{stats.bounds[0] / stats.top[0]:.1e}" in last


@pytest.mark.parametrize("name", list(CASES))
def test_restarted_lanczos_matches_eigvalsh(name: str) -> None:
    """With the basis capped at its minimum, thick restarts keep the answer (top-3 and
    lambda_min within 1e-6 of the dense Hessian's) and the certified bound."""
    model, x, y = setup(name)
    exact = np.linalg.eigvalsh(dense_hessian(model, x, y))
    cap = min_basis(3, True)
    with HessianOperator(model, x, lambda out: F.cross_entropy(out, y)) as op:
        res = lanczos(op.matvec, op.n, k=3, smallest=True, tol=1e-8, max_iter=2000, max_basis=cap)
    assert res.converged and res.restarts > 0 and res.basis == cap
    np.testing.assert_allclose([r.value for r in res.top], exact[::-1][:3], rtol=1e-6)
    assert res.bottom.value == pytest.approx(exact[0], rel=1e-6, abs=1e-6 * exact[-1])
    for r in (*res.top, res.bottom):
        assert np.min(np.abs(exact - r.value)) <= r.residual + 1e-12 * abs(exact[-1])


def test_restarts_keep_the_bound_on_a_clustered_spectrum() -> None:
    rng = np.random.default_rng(3)
    for trial in range(10):
        spectrum = np.sort(rng.standard_normal(400) ** 3)[::-1]
        plain = lanczos(_diagonal(spectrum), 400, tol=1e-6, max_iter=400, seed=trial)
        capped = lanczos(_diagonal(spectrum), 400, tol=1e-6, max_iter=400, seed=trial, max_basis=8)
        assert plain.converged and capped.converged and capped.basis == 8
        assert capped.restarts > 0 and plain.restarts == 0
        assert capped.iterations >= plain.iterations  # restarts cost products, never accuracy
        top = capped.top[0]
        assert np.min(np.abs(spectrum - top.value)) <= top.residual * (1 + 1e-9)
        assert abs(top.value - spectrum[0]) <= 1e-6 * spectrum[0]


def test_memory_caps_the_basis(monkeypatch) -> None:
    """The scan holds a Lanczos basis only when the whole run fits in half the free
    memory (and 1 GB): little memory means Lanczos on three vectors (said in a note) and
    the same answer; too little skips NH401 with the reason, and the other checks still
    run. (Restarts under a cap: the finite-difference path, and lanczos() below.)"""
    import nnhealth.curvature.measure as measure_module

    model, x, y = setup("mlp-layernorm-batchnorm")
    exact = np.linalg.eigvalsh(dense_hessian(model, x, y))
    n = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(measure_module, "available_memory", lambda device: 2 * 8 * n * 6)
    report = nnhealth.scan(
        model, (x, y), select=["NH401", "NH101"], hessian=True, hessian_tol=1e-8, hessian_budget=500
    )
    c = report.curvature
    assert c["basis_vectors"] == 3 and c["restarts"] == 0 and c["lanczos"] == "three-term"
    assert c["top_eigenvalues"][0] == pytest.approx(exact[-1], rel=1e-6)
    assert any("without a stored basis" in note for note in report.notes)
    monkeypatch.setattr(measure_module, "available_memory", lambda device: 8 * n)
    starved = nnhealth.scan(model, (x, y), select=["NH401", "NH101"], hessian=True)
    assert starved.curvature is None and "NH101" in starved.run["checks"]
    (skip,) = [s for s in starved.skipped if s.code == "NH401"]
    assert "not enough memory for Lanczos" in skip.reason and "GB" in skip.reason
    assert measure_module.available_memory(torch.device("cpu")) > 0  # this machine's own


@pytest.mark.parametrize("k", [1, 2, 5, 13, 14, 30])
def test_a_restart_at_the_minimum_basis_keeps_every_wanted_vector(k: int) -> None:
    """At the smallest cap a restart keeps the k wanted top Ritz vectors and one more,
    at least two from the bottom when the smallest is wanted, and leaves room for two
    new vectors; top and bottom never overlap."""
    for smallest in (False, True):
        size = min_basis(k, smallest)
        theta = np.random.default_rng(k).standard_normal(size)
        kept = _kept(theta, size, k, smallest)
        order = np.argsort(theta)[::-1]
        assert set(order[: k + 1]) <= set(kept)
        if smallest:
            assert set(order[-2:]) <= set(kept)
        assert len(set(kept)) == len(kept) <= size - 2


def test_many_wanted_values_and_the_smallest_under_the_minimum_cap() -> None:
    spectrum = np.sort(np.random.default_rng(3).standard_normal(300) ** 3)[::-1].copy()
    k = 14
    res = lanczos(
        _diagonal(spectrum),
        300,
        k=k,
        smallest=True,
        tol=1e-8,
        max_iter=5000,
        max_basis=min_basis(k, True),
    )
    assert res.converged and res.restarts > 0 and res.basis == min_basis(k, True)
    np.testing.assert_allclose([r.value for r in res.top], spectrum[:k], rtol=1e-8)
    assert res.bottom.value == pytest.approx(spectrum[-1], rel=1e-8)


def test_a_restarted_run_may_take_more_products_than_the_dimension() -> None:
    """n steps exhaust an unrestarted Krylov space, not a restarted one: the budget, not
    n, bounds a capped run."""
    spectrum = np.linspace(1.0, 0.0, 40)
    spectrum[0] = 1.001
    plain = lanczos(_diagonal(spectrum), 40, tol=1e-10, max_iter=1000)
    capped = lanczos(_diagonal(spectrum), 40, tol=1e-10, max_iter=1000, max_basis=6)
    assert plain.converged and plain.iterations <= 40
    assert capped.converged and capped.iterations > 40
    assert capped.top[0].value == pytest.approx(1.001, rel=1e-10)


def test_basis_reports_the_vectors_in_use_and_a_cap_is_the_peak(monkeypatch) -> None:
    """``basis`` is the most vectors held, not what was allocated; under a cap the basis
    is allocated once (growing by copies would briefly hold old + new)."""
    spectrum = np.linspace(10.0, 1.0, 500)
    spectrum[0] = 20.0  # a wide gap: converges in a few steps
    res = lanczos(_diagonal(spectrum), 500, tol=1e-6, max_iter=300)
    assert res.converged and res.restarts == 0 and res.basis == res.iterations < 16
    allocations = []
    real_empty = torch.empty

    def recording_empty(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        if out.dim() == 2 and out.shape[1] == 500:
            allocations.append(out.shape[0])
        return out

    monkeypatch.setattr(torch, "empty", recording_empty)
    spectrum = np.linspace(1.0, 0.0, 500)
    spectrum[0] = 1.001  # a close pair: needs restarts under a cap of 24
    capped = lanczos(_diagonal(spectrum), 500, tol=1e-10, max_iter=2000, max_basis=24)
    assert capped.converged and capped.restarts > 0 and capped.basis == 24
    assert allocations == [24]  # one allocation of the cap, never a larger peak
    allocations.clear()  # a cap the run never reaches: the rows it can write, once
    lanczos(_diagonal(spectrum), 500, tol=1e-10, max_iter=30, max_basis=1000)
    assert allocations == [30]


@pytest.mark.parametrize("bad_at", [1, 30])
def test_a_non_finite_product_raises_before_and_after_a_restart(bad_at: int) -> None:
    spectrum = np.linspace(1.0, 0.0, 200)
    d = torch.from_numpy(spectrum.copy())
    calls = []

    def matvec(v):
        calls.append(1)
        out = d * v
        if len(calls) >= bad_at:
            out[3] = float("inf") if bad_at == 1 else float("nan")
        return out

    with pytest.raises(NonFiniteProduct, match=f"product {bad_at} "):
        lanczos(matvec, 200, tol=1e-12, max_iter=500, max_basis=8)
    assert bad_at == 1 or len(calls) > 8  # the second case fails after restarting


def test_a_non_finite_hessian_skips_nh401_with_the_reason(monkeypatch) -> None:
    model, x, y = setup("mlp-layernorm-batchnorm")
    real = HessianOperator.matvec
    monkeypatch.setattr(HessianOperator, "matvec", lambda self, v: real(self, v) * float("nan"))
    report = nnhealth.scan(model, (x, y), select=["NH401", "NH101"], hessian=True)
    assert report.curvature is None and "NH101" in report.run["checks"]
    (skip,) = [s for s in report.skipped if s.code == "NH401"]
    assert "Hessian-vector products are not finite" in skip.reason


def test_the_scan_seeds_lanczos_with_the_loss_gradient(monkeypatch) -> None:
    """measure passes the loss gradient as Lanczos's start (checked against autograd)."""
    import nnhealth.curvature.measure as measure_module

    model, x, y = setup("mlp-layernorm-batchnorm")
    reference = copy.deepcopy(model)
    loss = F.cross_entropy(reference(x), y)
    expected = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(loss, list(reference.parameters()))]
    )
    seen = {}
    real = measure_module.start_vector

    def spy(n, start, *args, **kwargs):
        seen["start"] = start
        return real(n, start, *args, **kwargs)

    monkeypatch.setattr(measure_module, "start_vector", spy)
    nnhealth.scan(model, (x, y), select=["NH401"], hessian=True, loss="ce")
    torch.testing.assert_close(seen["start"], expected.detach(), rtol=1e-9, atol=1e-12)


def test_free_memory_respects_a_cgroup_limit(tmp_path, monkeypatch) -> None:
    """In a container /proc/meminfo shows the host; the cgroup limit (v2 or v1), less
    usage net of reclaimable page cache, is what the process can really take."""
    import nnhealth.curvature.measure as measure_module

    own = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    own.write_text("0::/job\n")
    (v2 / "job" / "memory.max").write_text("1000000\n")
    (v2 / "job" / "memory.current").write_text("600000\n")
    (v2 / "job" / "memory.stat").write_text("anon 400000\ninactive_file 100000\n")
    assert memory_module.cgroup_free(v2, own) == 1000000 - (600000 - 100000)
    (v2 / "job" / "memory.max").write_text("max\n")
    assert memory_module.cgroup_free(v2, own) is None  # no limit
    v1 = tmp_path / "v1"
    (v1 / "memory" / "box").mkdir(parents=True)
    own.write_text("4:memory:/box\n0::/\n")
    (v1 / "memory" / "box" / "memory.limit_in_bytes").write_text("2000000\n")
    (v1 / "memory" / "box" / "memory.usage_in_bytes").write_text("500000\n")
    (v1 / "memory" / "box" / "memory.stat").write_text("cache 9\ntotal_inactive_file 50000\n")
    assert memory_module.cgroup_free(v1, own) == 2000000 - 450000
    (v1 / "memory" / "box" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert memory_module.cgroup_free(v1, own) is None
    assert memory_module.cgroup_free(tmp_path / "absent", own) is None
    # a limit set on an ancestor (a systemd slice, a pod) binds a group that has none;
    # the tightest over the chain wins
    (v2 / "slice" / "svc").mkdir(parents=True)
    (v2 / "slice" / "memory.max").write_text("1000000\n")
    (v2 / "slice" / "memory.current").write_text("900000\n")
    (v2 / "slice" / "svc" / "memory.max").write_text("max\n")
    (v2 / "slice" / "svc" / "memory.current").write_text("800000\n")
    own.write_text("0::/slice/svc\n")
    assert memory_module.cgroup_free(v2, own) == 100000
    (v2 / "slice" / "svc" / "memory.max").write_text("850000\n")
    assert memory_module.cgroup_free(v2, own) == 50000
    # a malformed or undecodable cgroup file costs the cap, never the scan
    own.write_bytes(b"garbage\n\n\xff\xfe:x\n0::/slice/svc\n")
    assert memory_module.cgroup_free(v2, own) == 50000
    (v2 / "slice" / "svc" / "memory.stat").write_bytes(b"\xff\xfe\ninactive_file x\n")
    assert memory_module.cgroup_free(v2, own) == 50000
    # the scan takes the lesser of the system's and the cgroup's figure
    monkeypatch.setattr(memory_module, "cgroup_free", lambda: 12345)
    assert measure_module.available_memory(torch.device("cpu")) == 12345


def test_a_run_that_fits_whole_needs_no_restart_minimum(monkeypatch) -> None:
    """Memory for fewer vectors than a restarted run needs is still enough when the
    whole budget fits: no restart will happen."""
    import nnhealth.curvature.measure as measure_module

    monkeypatch.setattr(measure_module, "available_memory", lambda device: 2 * 8 * 1000 * 5)
    cpu = torch.device("cpu")
    assert measure_module.basis_cap(1000, cpu, top=3, smallest=True, budget=4) == 5
    # nor when the operator is so small that n + 1 vectors span its whole space
    monkeypatch.setattr(measure_module, "available_memory", lambda device: 2 * 8 * 4 * 5)
    assert measure_module.basis_cap(4, cpu, top=3, smallest=True, budget=100) == 5
    monkeypatch.setattr(measure_module, "available_memory", lambda device: 2 * 8 * 1000 * 5)
    with pytest.raises(measure_module.NoCurvature, match="not enough memory"):
        measure_module.basis_cap(1000, cpu, top=3, smallest=True, budget=100)


# -- benchmarks/curvature.py's reference numbers ------------------------------------------


def _benchmark():
    """benchmarks/curvature.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "curvature.py"
    spec = importlib.util.spec_from_file_location("curvature_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def _pyhessian_on_matrix(h: np.ndarray, v: np.ndarray, tol: float, eps: float = 1e-6):
    """PyHessian's eigenvalues() loop on a dense matrix in float64: (estimate, steps)."""
    estimate = None
    for step in range(1, 101):
        v = v / (np.linalg.norm(v) + eps)
        hv = h @ v
        new = float(hv @ v)
        v = hv / (np.linalg.norm(hv) + eps)
        if estimate is not None and abs(estimate - new) / (abs(estimate) + eps) < tol:
            return estimate, step
        estimate = new
    return estimate, 100


@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_the_benchmark_pyhessian_and_dense_truth_match_a_brute_force_run(tol: float) -> None:
    """The benchmark's PyHessian power iteration (float32, on our operator) takes as many
    steps as the same loop on the dense float64 Hessian, from the same start, and ends
    within 1e-5 relative of it; its dense truth is eigvalsh's to 1e-10."""
    bench = _benchmark()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).eval()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    h = dense_hessian(model.double(), x.double(), y)
    exact = float(np.linalg.eigvalsh(h)[-1])
    assert bench.dense(model, x.double(), y) == pytest.approx(exact, rel=1e-10)
    model.float()
    start = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(4)).double().numpy()
    expected, steps = _pyhessian_on_matrix(h, start, tol)
    value, hvps, _, limit = bench.pyhessian(model, x, y, tol, seed=4)
    assert hvps == steps and not limit and steps > 2
    assert value == pytest.approx(expected, rel=1e-5)
