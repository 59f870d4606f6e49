"""Long flat vectors for Lanczos: stored in the dtype the products take, inner products
and norms accumulated in float64.

At ~1e7 parameters a float32 ``torch.dot`` / ``vector_norm`` on CPU lost 3e-4 to 8e-4
relative accuracy (DOMAIN.md); here each block of ``CHUNK`` entries is widened to
float64 (a product of two float32 values is exact there) and summed in float64, so a
float32 vector needs no float64 copy of itself: the transient is one block.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 18  # entries widened at once: 2 MB of float64


def storage_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype Lanczos keeps its vectors in: the widest of the parameters' dtypes (a
    product is taken in each parameter's own dtype), and at least float32 (half-
    precision vectors would lose the recurrence)."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """a . b accumulated in float64."""
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return float(torch.dot(a, b))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for lo in range(0, a.numel(), CHUNK):
        total += torch.dot(a[lo : lo + CHUNK].double(), b[lo : lo + CHUNK].double())
    return float(total)


def norm(a: torch.Tensor) -> float:
    """||a||_2 accumulated in float64."""
    if a.dtype == torch.float64:
        return float(torch.linalg.vector_norm(a))
    return dot(a, a) ** 0.5


def project(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows @ w (float64, one entry per row) accumulated in float64, a column block at a
    time."""
    if rows.dtype == torch.float64 and w.dtype == torch.float64:
        return rows @ w
    block = max(4096, CHUNK // max(1, rows.shape[0]))
    total = torch.zeros(rows.shape[0], dtype=torch.float64, device=w.device)
    for lo in range(0, w.numel(), block):
        total += rows[:, lo : lo + block].double() @ w[lo : lo + block].double()
    return total


def random_unit(
    n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device | str, skip: int = 0
) -> torch.Tensor:
    """A random unit vector (Gaussian direction) in ``dtype``, drawn a block at a time in
    float64 (no float64 copy of the whole vector), after ``skip`` vectors' draws (to
    draw the second of a sequence again without the first)."""
    for _ in range(skip):
        for lo in range(0, n, CHUNK):
            torch.randn(min(n, lo + CHUNK) - lo, generator=gen, dtype=torch.float64)
    out = torch.empty(n, dtype=dtype, device=device)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        out[lo:hi] = torch.randn(hi - lo, generator=gen, dtype=torch.float64)
    return out.div_(norm(out))
