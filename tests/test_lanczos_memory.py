"""Lanczos in a few parameter vectors: the three-term variant (no stored basis, spurious
copies screened) and the stored basis in the products' dtype, each against the dense
Hessian, against each other, and chosen by memory in a scan.

Ground truth: the dense Hessian by reverse-over-reverse autodiff (conftest.dense_hessian)
and numpy's eigvalsh in float64. Tolerance: top-3 and lambda_min within 1e-6 of the
spectrum's scale (max |eigenvalue|), at a Lanczos tolerance of 1e-10.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import dense_hessian
from torch import nn

import nnhealth
import nnhealth.curvature.measure as measure_module
from nnhealth.curvature import vectors
from nnhealth.curvature.hvp import HessianOperator
from nnhealth.curvature.lanczos import lanczos
from nnhealth.curvature.threeterm import lanczos_three_term


def tanh_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 4)
    )


def norms_net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Linear(8, 4),
    )


MODELS = {"tanh-mlp": tanh_mlp, "layernorm-batchnorm": norms_net}
VARIANTS = {
    "full": lambda matvec, n, **kw: lanczos(matvec, n, **kw),
    "three-term": lambda matvec, n, **kw: lanczos_three_term(matvec, n, **kw),
}


def setup(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype).train()
    x, y = torch.randn(32, 6, dtype=dtype), torch.randint(0, 4, (32,))
    return model, x, y


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_each_variant_matches_the_dense_hessian(name: str, variant: str) -> None:
    model, x, y = setup(name)
    exact = truth(model, x, y)
    scale = np.max(np.abs(exact))
    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y)) as op:
        res = VARIANTS[variant](op.matvec, op.n, k=3, smallest=True, tol=1e-10, max_iter=600)
    assert res.variant == variant and res.dtype == torch.float64
    top = [r.value for r in res.top]
    np.testing.assert_allclose(top, exact[::-1][:3], rtol=0, atol=1e-6 * scale)
    assert abs(res.bottom.value - exact[0]) <= 1e-6 * scale
    for r in (*res.top, res.bottom):  # the certified bound holds
        assert np.min(np.abs(exact - r.value)) <= r.bound + 1e-12 * scale


def truth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """eigvalsh of the dense Hessian, BatchNorm on batch statistics (a copy whose
    BatchNorm updates no buffers, as torch.func needs)."""
    ref = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(ref)
    return np.linalg.eigvalsh(dense_hessian(ref, x, y))


def _diagonal(spectrum: np.ndarray, dtype: torch.dtype):
    d = torch.from_numpy(spectrum).to(dtype)
    return lambda v: d * v.to(dtype)


GHOST_SPECTRUM = np.concatenate([[100.0, 60.0, 40.0], np.linspace(0.0, 10.0, 1997)])


def test_ghost_copies_are_in_the_raw_ritz_values_and_not_in_the_report() -> None:
    """Without reorthogonalization three well-separated top eigenvalues converge early
    and T_k then grows copies of each (ten of 100 after 120 steps here) and, between
    them, spurious values near no eigenvalue. The raw Ritz values show both; the
    reported top-5 holds each eigenvalue once and nothing spurious."""
    for dtype, steps in ((torch.float64, 120), (torch.float32, 60)):
        raw: list[np.ndarray] = []
        res = lanczos_three_term(
            _diagonal(GHOST_SPECTRUM, dtype),
            GHOST_SPECTRUM.size,
            k=5,
            tol=1e-14,
            max_iter=steps,
            dtype=dtype,
            raw=raw,
        )
        theta = raw[-1]
        assert np.sum(np.abs(theta - 100.0) < 1e-4) >= 3  # copies of lambda_max
        top = [r.value for r in res.top]
        np.testing.assert_allclose(top[:3], [100.0, 60.0, 40.0], rtol=1e-6)
        assert all(t <= 10.0 + 1e-6 for t in top[3:])  # the bulk's edge, no copy, no ghost
        if dtype == torch.float32:  # a spurious value far from every eigenvalue
            far = [t for t in theta if np.min(np.abs(GHOST_SPECTRUM - t)) > 1.0]
            assert far and not set(far) & set(top)
    full = lanczos(
        _diagonal(GHOST_SPECTRUM, torch.float64), GHOST_SPECTRUM.size, k=5, tol=1e-14, max_iter=120
    )
    np.testing.assert_allclose([r.value for r in full.top][:3], [100.0, 60.0, 40.0], rtol=1e-12)


def test_a_copy_is_screened_by_multiplicity_and_a_spurious_value_by_the_reduced_matrix() -> None:
    from nnhealth.curvature.threeterm import screened

    theta = np.array([1.0, 2.0, 5.0, 7.0, 7.0 + 1e-12])
    hat = np.array([1.5, 5.0])  # 5.0 is also an eigenvalue of T without its first row
    residual = np.array([0.1, 0.1, 0.1, 1e-3, 1e-6])
    assert screened(theta, hat, residual, 1e-9, 1e-14) == [0, 1, 4]
    # a true value with little start-vector weight sits 1e-7 from hat: kept
    assert screened(theta, hat + np.array([0.0, 1e-7]), residual, 1e-6, 1e-14) == [0, 1, 2, 4]


def larger(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 1024), nn.Tanh(), nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 10)
    ).to(dtype)
    return model, torch.randn(256, 256, dtype=dtype), torch.randint(0, 10, (256,))


def test_the_variants_agree_within_their_bounds_on_a_larger_float32_model() -> None:
    model, x, y = larger()
    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y)) as op:
        assert 5e5 < op.n < 1e6
        kw = {"k": 3, "tol": 1e-3, "max_iter": 100, "dtype": torch.float32}
        full = lanczos(op.matvec, op.n, **kw)
        three = lanczos_three_term(op.matvec, op.n, **kw)
    assert full.converged and three.converged and full.dtype == three.dtype == torch.float32
    for a, b in zip(full.top, three.top, strict=True):
        assert abs(a.value - b.value) <= a.bound + b.bound


def test_products_come_back_in_the_vectors_dtype() -> None:
    model, x, y = setup("layernorm-batchnorm", torch.float32)
    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y)) as op:
        v = torch.randn(op.n, dtype=torch.float64)
        wide, narrow = op.matvec(v), op.matvec(v.float())
    assert wide.dtype == torch.float64 and narrow.dtype == torch.float32
    # the same product (taken in float32 both times), only the return dtype differs
    torch.testing.assert_close(
        narrow.double(), wide, rtol=1e-6, atol=1e-6 * float(wide.abs().max())
    )


def test_inner_products_are_accumulated_in_float64() -> None:
    """Float32 vectors, float64 sums: against the same values' float64 dot product to
    1e-12, where float32 accumulation is off by far more at this length."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(4_000_000, generator=gen).add_(1.0)
    b = torch.rand(4_000_000, generator=gen).add_(1.0)
    exact = float(torch.dot(a.double(), b.double()))
    assert abs(vectors.dot(a, b) - exact) <= 1e-12 * exact
    assert abs(vectors.norm(a) - float(a.double().norm())) <= 1e-12 * float(a.double().norm())
    rows = torch.stack([a, b])
    np.testing.assert_allclose(
        vectors.project(rows, b).numpy(), [exact, float(b.double() @ b.double())], rtol=1e-12
    )


def _scan(model, x, y, **kw):
    return nnhealth.scan(model, (x, y), select=["NH401", "NH101"], hessian=True, **kw)


def test_the_scan_chooses_the_variant_by_memory_and_says_which(monkeypatch) -> None:
    model, x, y = setup("layernorm-batchnorm")
    exact = truth(model, x, y)
    stored = _scan(model, x, y, hessian_tol=1e-8, hessian_budget=300).curvature
    assert stored["lanczos"] == "full" and stored["basis_dtype"] == "float64"
    assert stored["top_eigenvalues"][0] == pytest.approx(exact[-1], rel=1e-6)
    monkeypatch.setattr(measure_module, "BASIS_LIMIT", 1000)  # bytes: no basis fits
    report = _scan(model, x, y, hessian_tol=1e-8, hessian_budget=300)
    c = report.curvature
    assert c["lanczos"] == "three-term" and c["basis_vectors"] == 3
    assert c["top_eigenvalues"][0] == pytest.approx(exact[-1], rel=1e-6)
    (note,) = [n for n in report.notes if "without a stored basis" in n]
    n = sum(p.numel() for p in model.parameters())  # < 300: n products span the space
    assert "3 float64 vectors" in note and f"{n} products" in note
    # float32 models store float32 vectors
    small = _scan(*setup("tanh-mlp", torch.float32)).curvature
    assert small["basis_dtype"] == "float32" and small["lanczos"] == "three-term"
    # not even the three vectors: skipped with one line, the other checks run
    monkeypatch.setattr(measure_module, "available_memory", lambda device: 4 * 8 * n)
    starved = _scan(model, x, y)
    (skip,) = [s for s in starved.skipped if s.code == "NH401"]
    assert starved.curvature is None and "NH101" in starved.run["checks"]
    assert skip.reason.startswith("not enough memory for Lanczos: even without a stored basis")
    assert "\n" not in skip.reason


def test_a_small_model_keeps_the_stored_basis_under_the_real_budget() -> None:
    """No patching: this machine's memory and the 1 GB limit leave a 1M-parameter
    float32 model its basis (101 vectors, 0.3 GB), with float32 vectors."""
    model, x, y = larger()
    c = _scan(model, x, y).curvature
    assert c["lanczos"] == "full" and c["basis_dtype"] == "float32" and c["converged"]
