"""Lanczos with full reorthogonalization for the extreme eigenvalues of a symmetric
operator, stopping on a bound, not on the change between iterations. torch + scipy.

Vectors are stored in the dtype the products take (float32 for a float32 model: they
are cast to the parameters' dtype for each product anyway); inner products and norms
are accumulated in float64 (vectors.py: in float32 they lose ~1e-4 at 1e7 parameters,
enough to push an estimate past the true eigenvalue). The tridiagonal
matrix is solved by scipy.linalg.eigh_tridiagonal. For a Ritz pair (theta, y) of the
k-step factorization, the residual r = |beta_k * y_k| certifies an eigenvalue in
[theta - r, theta + r]; when the other eigenvalues are at least ``gap`` away the error
is at most r^2 / gap (Kato-Temple). The gap is only known through the neighbouring Ritz
value, which can overstate it (a close pair not yet resolved), so that quadratic figure
is reported as an estimate and Lanczos stops on the certified residual alone.

The start vector can be seeded (the scan passes the loss gradient, which in practice lies
close to the top eigenspace: Gur-Ari, Roberts & Dyer 2018); an equal-norm random part is
always added, so an eigenvector the seed is orthogonal to (by a symmetry of the model,
say) is still in the Krylov space, with typically about 1/sqrt(2) of the weight a purely
random start would give it and never less than half (the sum of two unit vectors has
norm at most 2): the seeded start is never much worse than a random one. Each new
vector is orthogonalized against the whole basis by classical Gram-Schmidt, with a second
pass only when the first removed most of it (the Daniel-Gragg-Kaufman-Stewart test): one pass over the basis per step, usually.

This module keeps the whole basis ("full"); threeterm.py keeps three vectors and screens
the copies that loss of orthogonality brings. Reorthogonalization is full, not
selective (Parlett-Scott): one or two float64-accumulated passes over the basis cost
about 4 j n flops at step j, against a product's several forward+backward passes (each
at least 6 n flops per example), and full reorthogonalization needs no estimate of the
orthogonality level to stay right; the basis is only kept while it is small (measure.
choose), so the passes stay short. The basis costs one vector (n values of its dtype)
per step. With ``max_basis`` it is capped (the
whole of it, allocated once, so that is also the peak): when it is full, Lanczos restarts
thickly (Wu & Simon 2000), keeping the best Ritz vectors (the wanted end of the spectrum,
about half the basis) and the residual, so the factorization H V = V T + r e^T, and with
it the certified residual bound, carries on; T is then no longer tridiagonal and is
solved densely.

A product that is not finite (the loss overflows its second derivative at this point)
raises NonFiniteProduct: no estimate built on it means anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh, eigh_tridiagonal

from nnhealth.curvature import vectors

Matvec = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteProduct(ArithmeticError):
    """The operator returned Inf or NaN: there is no eigenvalue estimate to give."""


@dataclass(frozen=True)
class RitzValue:
    value: float
    residual: float  # certified: an eigenvalue lies within this distance; used to stop
    estimate: float  # min(residual, residual^2 / Ritz gap): usually closer to the true error

    @property
    def bound(self) -> float:
        return self.residual

    @property
    def relative_bound(self) -> float:
        return self.residual / abs(self.value) if self.value else float("inf")


@dataclass(frozen=True)
class LanczosResult:
    top: tuple[RitzValue, ...]  # largest first
    bottom: RitzValue | None  # the smallest eigenvalue, when asked for
    iterations: int  # = operator products
    converged: bool
    restarts: int = 0  # thick restarts forced by max_basis
    basis: int = 0  # the most vectors in use at once (their memory: basis * n * itemsize)
    top_vector: torch.Tensor | None = None  # the top Ritz vector (unit), when asked for
    variant: str = "full"  # "full" (stored basis) or "three-term" (threeterm.py)
    dtype: torch.dtype = torch.float64  # of the stored vectors


def _ritz(t: np.ndarray, tridiagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    if len(t) == 1:
        return t.diagonal().copy(), np.ones((1, 1))
    if tridiagonal:
        return eigh_tridiagonal(t.diagonal().copy(), t.diagonal(1).copy())
    return eigh(t, check_finite=False)


def _pair(theta: np.ndarray, vecs: np.ndarray, i: int, beta_next: float) -> RitzValue:
    residual = abs(beta_next * vecs[-1, i])
    others = np.delete(theta, i)
    gap = np.min(np.abs(others - theta[i])) if others.size else np.inf
    # the quadratic estimate needs the gap to the true spectrum; the Ritz gap can exceed
    # it (a close pair not yet resolved), so it is reported, never used to stop
    estimate = min(residual, residual**2 / gap) if 0 < gap < np.inf else residual
    return RitzValue(float(theta[i]), float(residual), float(estimate))


_DGKS = 0.5**0.5  # reorthogonalize again when a pass leaves less than this of the norm


def start_vector(
    n: int,
    start: torch.Tensor | None,
    gen: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A random unit vector plus the unit ``start`` (when finite and nonzero), unit, in
    ``dtype``."""
    q = vectors.random_unit(n, gen, dtype, device)
    if start is not None:
        s = start.detach().reshape(-1)
        if s.numel() != n:
            raise ValueError(f"start vector has {s.numel()} entries, the operator {n}")
        norm = vectors.norm(s)
        if np.isfinite(norm) and norm > 0:
            for lo in range(0, n, vectors.CHUNK):  # no full-length temporary
                piece = s[lo : lo + vectors.CHUNK].to(device=device, dtype=torch.float64)
                q[lo : lo + vectors.CHUNK] += (piece / norm).to(dtype)
    return q.div_(vectors.norm(q))


def _lanczos_step(w: torch.Tensor, q_all: torch.Tensor, known: np.ndarray) -> float:
    """Turn ``w = A q_j`` (in place) into the next residual: remove the components the
    recurrence already knows (``known``: the couplings of q_j to the earlier rows, only
    beta_{j-1} except just after a restart), then reorthogonalize against the whole
    basis ``q_all`` (rows, q_j last). Returns alpha_j."""
    current = q_all[-1]
    alpha = vectors.dot(current, w)
    w.sub_(current, alpha=alpha)
    nonzero = np.flatnonzero(known)
    if nonzero.size == 1 and nonzero[0] == len(known) - 1:
        w.sub_(q_all[-2], alpha=float(known[-1]))  # the plain three-term recurrence
    elif nonzero.size:
        coupling = torch.as_tensor(known, dtype=w.dtype, device=w.device)
        w.addmv_(q_all[:-1].T, coupling, alpha=-1)
    # one classical Gram-Schmidt pass removes what rounding left on the basis; a second
    # only when that pass cancelled most of w (DGKS), since then rounding in it matters
    for _ in range(2):  # "twice is enough" (Parlett)
        before = vectors.norm(w)
        coef = vectors.project(q_all, w)
        w.addmv_(q_all.T, coef.to(w.dtype), alpha=-1)
        alpha += float(coef[-1])
        if vectors.norm(w) >= _DGKS * before:
            break
    return alpha


def _kept(theta: np.ndarray, size: int, k: int, smallest: bool) -> np.ndarray:
    """Which Ritz vectors a thick restart keeps: about half the basis from the top (at
    least the k wanted and one more), and when the smallest is wanted too, a third as
    many from the bottom (at least two); at least two slots are left for new vectors."""
    order = np.argsort(theta)[::-1]
    n_top = max(k + 1, size // 2)
    n_bottom = max(2, min(n_top // 3, size - n_top - 2)) if smallest else 0
    return np.concatenate([order[:n_top], order[len(order) - n_bottom :]])


def _compress(basis: torch.Tensor, size: int, s_keep: np.ndarray, chunk: int = 1 << 16) -> None:
    """basis[:p] = S_keep^T basis[:size], in place, a column block at a time (so the
    restart needs no second basis-sized buffer)."""
    s_t = torch.as_tensor(s_keep.T.copy(), dtype=torch.float64, device=basis.device)
    p = s_t.shape[0]
    for lo in range(0, basis.shape[1], chunk):
        block = s_t @ basis[:size, lo : lo + chunk].to(torch.float64)
        basis[:p, lo : lo + chunk] = block


def min_basis(k: int, smallest: bool) -> int:
    """The fewest vectors a restarted run can work with: what a restart keeps (see
    _kept) and room for as many new ones."""
    return 2 * (k + 1) + (4 if smallest else 2)


# products before a certified stop is accepted: the residual bound certifies an
# eigenvalue near the Ritz value, not that it is the top; a top eigenvector barely
# present in the start vector needs a few steps to enter the Krylov space (at tol 1e-2
# an Adam-preconditioned MLP stopped at 4 products on its second eigenvalue, 2.5% below
# the top; 6 found it: tests/test_optimizer_limits.py). 8 leaves a margin and costs a
# few products on models that certify sooner
MIN_ITER = 8


def lanczos(
    matvec: Matvec,
    n: int,
    *,
    k: int = 1,
    smallest: bool = False,
    tol: float = 1e-2,
    max_iter: int = 100,
    seed: int = 0,
    start: torch.Tensor | None = None,
    max_basis: int | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
    vector: bool = False,
    min_iter: int = MIN_ITER,
    dtype: torch.dtype = torch.float64,
    first: list[torch.Tensor] | None = None,
) -> LanczosResult:
    """Top-``k`` eigenvalues (and the smallest when ``smallest``) of the operator, and
    the top Ritz vector when ``vector``.

    ``start`` seeds the first vector (a random part is always mixed in, see above);
    ``first``: [the unit first vector, its product], taken as they are (the scan's
    symmetry test made them) and over: the list is emptied, the product changed in place.
    Vectors are stored in ``dtype``.
    ``max_basis`` caps the vectors held at once (thick restarts; at least
    ``min_basis(k, smallest)``). Stops when every wanted Ritz value has ``bound <= tol *
    |value|`` after at least ``min_iter`` products, when the Krylov space is exhausted
    (exact), or after ``max_iter`` products
    (``converged`` False, the last estimates and their bounds returned, never an
    exception).
    """
    k = max(1, min(k, n))
    steps = min(max_iter, n)  # n steps exhaust the Krylov space of an unrestarted run
    cap = steps + 1
    if max_basis is not None and max_basis < cap:
        cap = min(cap, max(max_basis, min_basis(k, smallest)))
        steps = max_iter  # restarted: n steps no longer exhaust anything
    gen = torch.Generator(device="cpu").manual_seed(seed)
    krylov = _Krylov(n, cap, min(cap, steps), max_basis is not None, device, dtype)
    if first is None:
        krylov.basis[0] = start_vector(n, start, gen, device, dtype)
    else:
        krylov.basis[0] = first[0]
        krylov.known_product = first[1]
        first.clear()
    top: tuple[RitzValue, ...] = ()
    bottom = None
    converged = False
    least = min(min_iter, steps)
    it = 0
    for it in range(1, steps + 1):
        w, b = krylov.extend(matvec, it)
        theta, vecs = krylov.ritz()
        top, bottom = _wanted(theta, vecs, b, k, smallest)
        if progress is not None:
            progress(it, top[0].value, top[0].relative_bound)
        if _finished(theta, b, top, bottom, k, tol) and (it >= least or exhausted(theta, b)):
            converged = True
            break
        if it == steps:
            break
        krylov.advance(w, b, theta, vecs, k, smallest)
    y = krylov.vector(vecs[:, int(np.argmax(theta))]) if vector else None
    return LanczosResult(
        top=top,
        bottom=bottom,
        iterations=it,
        converged=converged,
        restarts=krylov.restarts,
        basis=cap if krylov.restarts else krylov.size,  # size only shrinks at a restart
        top_vector=y,
        dtype=dtype,
    )


class _Krylov:
    """The factorization H V = V T + r e^T so far: the basis V (rows), the projected
    matrix T = V^T H V, and the couplings of the newest vector to the earlier ones.

    The basis is one matrix, so that reorthogonalization is two matrix-vector products
    over it, not a Python loop. Under a cap (``capped``) it is allocated whole at once,
    so the cap is the peak (growing would briefly hold old + new; on the CPU pages are
    only touched as rows fill, on a GPU the cap is reserved at once); otherwise it grows
    by doubling up to ``full`` rows, the most an unrestarted run writes."""

    known_product: torch.Tensor | None = None  # the first vector's, when given

    def __init__(
        self,
        n: int,
        cap: int,
        full: int,
        capped: bool,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        rows = full if capped else min(full, 16)
        self.basis = torch.empty((rows, n), dtype=dtype, device=device)
        self.full = full
        self.t = np.zeros((cap, cap))
        self.size = 1
        self.known = np.zeros(0)  # couplings of the newest vector to the earlier ones
        self.restarts = 0

    def extend(self, matvec: Matvec, it: int) -> tuple[torch.Tensor, float]:
        """One product on the newest vector: T's new row and column, and the residual
        (unnormalized) with its norm."""
        j = self.size - 1
        t = self.t
        w, self.known_product = self.known_product, None
        if w is None:
            w = matvec(self.basis[j])
        w = w.to(self.basis.dtype)  # a copy only when the product comes in another dtype
        t[j, j] = _lanczos_step(w, self.basis[: self.size], self.known)
        t[j, :j] = t[:j, j] = self.known
        b = vectors.norm(w)
        if not (np.isfinite(t[j, j]) and np.isfinite(b)):
            raise NonFiniteProduct(f"product {it} of the operator is not finite")
        return w, b

    def vector(self, coefficients: np.ndarray) -> torch.Tensor:
        """The Ritz vector V^T s of the current basis, normalized."""
        s = torch.as_tensor(coefficients, dtype=torch.float64, device=self.basis.device)
        y = s @ self.basis[: self.size].to(torch.float64)
        return y / torch.linalg.vector_norm(y)

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        return _ritz(self.t[: self.size, : self.size], tridiagonal=self.restarts == 0)

    def advance(
        self, w: torch.Tensor, b: float, theta: np.ndarray, vecs: np.ndarray, k: int, smallest: bool
    ) -> None:
        """Append the normalized residual, after a thick restart when the basis is at
        its cap (the kept Ritz vectors, then the residual)."""
        if self.size == self.t.shape[0]:
            self._restart(b, theta, vecs, k, smallest)
        else:
            self.known = np.zeros(self.size)
            self.known[-1] = b
        if self.size == self.basis.shape[0]:
            grown = torch.empty(
                (min(2 * self.size, self.full), self.basis.shape[1]),
                dtype=self.basis.dtype,
                device=self.basis.device,
            )
            grown[: self.size] = self.basis[: self.size]
            self.basis = grown
        self.basis[self.size] = w / b
        self.size += 1

    def _restart(
        self, b: float, theta: np.ndarray, vecs: np.ndarray, k: int, smallest: bool
    ) -> None:
        keep = _kept(theta, self.size, k, smallest)
        _compress(self.basis, self.size, vecs[:, keep])
        self.t[:] = 0.0
        self.size = len(keep)
        self.t[np.arange(self.size), np.arange(self.size)] = theta[keep]
        self.known = b * vecs[-1, keep]
        self.restarts += 1


def _wanted(
    theta: np.ndarray, vecs: np.ndarray, b: float, k: int, smallest: bool
) -> tuple[tuple[RitzValue, ...], RitzValue | None]:
    """The top ``k`` Ritz values (largest first) and the smallest when asked for."""
    order = np.argsort(theta)[::-1]
    wanted = min(k, len(theta))
    top = tuple(_pair(theta, vecs, int(i), b) for i in order[:wanted])
    bottom = _pair(theta, vecs, int(order[-1]), b) if smallest else None
    return top, bottom


def _finished(
    theta: np.ndarray,
    b: float,
    top: tuple[RitzValue, ...],
    bottom: RitzValue | None,
    k: int,
    tol: float,
) -> bool:
    """The Krylov space is exhausted, or every wanted value is certified to ``tol``: the
    top values relative to themselves; the smallest relative to the largest (a saddle's
    small negative eigenvalue is judged against the curvature scale)."""
    done = len(top) == k and all(r.bound <= tol * abs(r.value) for r in top)
    if bottom is not None:
        done = done and bottom.bound <= tol * max(abs(bottom.value), abs(top[0].value))
    return exhausted(theta, b) or done


def exhausted(theta: np.ndarray, b: float) -> bool:
    """The Krylov space is invariant: the Ritz values are exact eigenvalues."""
    return b <= 1e-12 * max(abs(theta).max(), 1e-300)
