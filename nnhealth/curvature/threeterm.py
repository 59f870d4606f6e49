"""Lanczos without a stored basis: three vectors (the previous, the current, the new),
for models whose basis would not fit (measure.scan_lanczos chooses).

The recurrence is Paige's form (w = A q_j - beta_{j-1} q_{j-1}; alpha_j = q_j . w;
w -= alpha_j q_j, once more against q_j), vectors stored in the dtype the products take,
inner products and norms accumulated in float64 (vectors.py). Without
reorthogonalization the vectors lose orthogonality once a Ritz value converges, and
T_k grows copies of it (Paige 1976). The answer is still in T_k:

* a Ritz pair's residual |beta_k s_k| still bounds the distance to an eigenvalue, up to
  rounding (Paige 1980): the bound reported adds k * eps * ||T|| for that, eps the
  storage dtype's;
* Cullum-Willoughby: a Ritz value of T_k that is also an eigenvalue of T_k without its
  first row and column is spurious (it has no weight on the start vector) unless it is
  multiple; a multiple one (numerically equal copies) is one eigenvalue, reported once.
  Copies agree to the rounding of the recurrence: COPY_TOL eps ||T||, eps the storage
  dtype's. A spurious value matches T_k's reduced matrix to the rounding of T's float64
  eigensolver (measured: 0 to 1e-14 ||T||, against 1e-10 to 1e-6 for true values whose
  start-vector weight is small), so that test uses COPY_TOL x float64's eps: with the
  storage eps a true lambda_max with little weight in the start vector was dropped.

The top Ritz vector is not available (no basis); the finite-difference path, which
needs it, runs on a stored basis (measure.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from nnhealth.curvature import vectors
from nnhealth.curvature.lanczos import (
    MIN_ITER,
    LanczosResult,
    Matvec,
    NonFiniteProduct,
    RitzValue,
    _finished,
    exhausted,
    start_vector,
)

COPY_TOL = 100.0  # in units of eps ||T||: Ritz values this close are one eigenvalue


def ritz_values(alpha: list[float], beta: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the tridiagonal T_k."""
    if len(alpha) == 1:
        return np.array(alpha), np.ones((1, 1))
    return eigh_tridiagonal(np.array(alpha), np.array(beta))


def screened(
    theta: np.ndarray, hat: np.ndarray, residual: np.ndarray, tol: float, spurious: float
) -> list[int]:
    """Indices (ascending) of the Ritz values that stand for distinct eigenvalues: each
    cluster of values within ``tol`` of its neighbour is one (its member with the
    least residual); a lone value within ``spurious`` of an eigenvalue ``hat`` of T_k
    without its first row and column is spurious (Cullum-Willoughby) and dropped."""
    kept: list[int] = []
    i = 0
    while i < len(theta):
        j = i + 1
        while j < len(theta) and theta[j] - theta[j - 1] <= tol:
            j += 1
        if j - i > 1:
            kept.append(i + int(np.argmin(residual[i:j])))
        elif not (hat.size and np.min(np.abs(hat - theta[i])) <= spurious):
            kept.append(i)
        i = j
    return kept


def _pairs(
    theta: np.ndarray, residual: np.ndarray, good: list[int], k: int, smallest: bool
) -> tuple[tuple[RitzValue, ...], RitzValue | None]:
    """The top ``k`` good values (largest first) and the smallest, with the estimate
    r^2 / gap over the gaps between good values."""
    values = theta[good]

    def pair(i: int) -> RitzValue:
        r = float(residual[good[i]])
        others = np.delete(values, i)
        gap = np.min(np.abs(others - values[i])) if others.size else np.inf
        estimate = min(r, r**2 / gap) if 0 < gap < np.inf else r
        return RitzValue(float(values[i]), r, float(estimate))

    top = tuple(pair(i) for i in range(len(good) - 1, max(-1, len(good) - 1 - k), -1))
    return top, (pair(0) if smallest else None)


def lanczos_three_term(
    matvec: Matvec,
    n: int,
    *,
    k: int = 1,
    smallest: bool = False,
    tol: float = 1e-2,
    max_iter: int = 100,
    seed: int = 0,
    start: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
    min_iter: int = MIN_ITER,
    dtype: torch.dtype = torch.float64,
    first: list[torch.Tensor] | None = None,
    raw: list[np.ndarray] | None = None,
) -> LanczosResult:
    """lanczos.lanczos's answer (same arguments, no ``vector`` nor ``max_basis``) from
    three vectors. ``first``: [the unit first vector, its product], taken over (emptied).
    ``raw``: a list the raw Ritz values of the last T_k are appended to (for tests)."""
    k = max(1, min(k, n))
    if first is None:
        q = start_vector(n, start, torch.Generator(device="cpu").manual_seed(seed), device, dtype)
        w = None
    else:
        q, w = first[0].to(dtype), first[1]
        first.clear()
    eps = torch.finfo(dtype).eps
    alpha: list[float] = []
    beta: list[float] = []
    prev: torch.Tensor | None = None
    top: tuple[RitzValue, ...] = ()
    bottom = None
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        w = (matvec(q) if w is None else w).to(dtype)
        a, b = _step(w, q, prev, beta[-1] if beta else 0.0)
        if not (np.isfinite(a) and np.isfinite(b)):
            raise NonFiniteProduct(f"product {it} of the operator is not finite")
        alpha.append(a)
        theta, s = ritz_values(alpha, beta)
        hat = ritz_values(alpha[1:], beta[1:])[0] if it > 1 else np.zeros(0)
        scale = float(np.max(np.abs(theta)))
        residual = np.abs(b * s[-1]) + it * eps * scale
        wide = torch.finfo(torch.float64).eps
        good = screened(theta, hat, residual, COPY_TOL * eps * scale, COPY_TOL * wide * scale)
        if not good:  # every value screened (cannot happen for the extremes; kept safe)
            good = list(range(len(theta)))
        top, bottom = _pairs(theta, residual, good, k, smallest)
        if progress is not None:
            progress(it, top[0].value, top[0].relative_bound)
        done = _finished(theta, b, top, bottom, k, tol)
        if done and (it >= min(min_iter, n) or exhausted(theta, b)):
            converged = True
            break
        if exhausted(theta, b):
            break
        beta.append(b)
        prev, q, w = q, w.div_(b), None
    if raw is not None:
        raw.append(theta)
    return LanczosResult(
        top=top,
        bottom=bottom,
        iterations=it,
        converged=converged,
        basis=3,
        variant="three-term",
        dtype=dtype,
    )


def _step(
    w: torch.Tensor, q: torch.Tensor, prev: torch.Tensor | None, beta: float
) -> tuple[float, float]:
    """w = A q (in place) into the next residual; (alpha, its norm). A second pass
    against q (local reorthogonalization) keeps alpha accurate; the old vector is not
    revisited."""
    if prev is not None:
        w.sub_(prev, alpha=beta)
    a = vectors.dot(q, w)
    w.sub_(q, alpha=a)
    c = vectors.dot(q, w)
    w.sub_(q, alpha=c)
    return a + c, vectors.norm(w)
