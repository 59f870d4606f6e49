"""Statistics of tensors in any floating dtype, computed in float32/float64.

Released checkpoints come in bfloat16, float16 and float8. numpy has none of these,
several float8 kernels are missing on CPU (sum, isfinite, promotion to float64 inside
a reduction), and half-precision accumulators are wrong: bfloat16 keeps 8 significant
bits, so a sum of squares over a large layer in bfloat16 stops growing long before the
end. Every float narrower than 32 bits converts to float32 exactly (their values are a
subset of float32's), so the values are upcast first and reduced in float32 or, for
the weight statistics, float64, a bounded chunk at a time (no float64 copy of a whole
large tensor).

Narrow dtypes also make equal values common: bfloat16 has 256 values per octave,
float8 e4m3 has 8. ``collision_probability`` says how likely two independent random
values are to round to the same one, which is what a symmetry check must discount
before calling equal weights a copy.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

_CHUNK = 1 << 18  # elements per float64 block: 2 MiB, stays in cache (32 MiB took 9x as long)


def readable(t: torch.Tensor) -> bool:
    """A floating tensor whose values can be read (packed 4-bit floats cannot)."""
    return t.is_floating_point() and _convertible(t.dtype)


@functools.lru_cache(maxsize=32)
def _convertible(dtype: torch.dtype) -> bool:
    """Whether values of ``dtype`` convert to float32 (float4_e2m1fn_x2 has no kernel, and
    its finfo cannot be printed)."""
    try:
        one = torch.zeros(dtype.itemsize, dtype=torch.uint8).view(dtype)
        one.to(torch.float32)
        float(torch.finfo(dtype).eps)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def exact32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 (or float64 when it already is): exact for every narrower float."""
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.to(torch.float32)


def _blocks(t: torch.Tensor):
    """``t``'s values in float64, a block at a time, each copied into the same buffer
    (the caller may change it in place; it is overwritten by the next block)."""
    flat = t.detach().reshape(-1)
    buffer = torch.empty(min(flat.numel(), _CHUNK), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        yield buffer[: part.numel()].copy_(part)


def norm64(t: torch.Tensor) -> float:
    """Euclidean norm, accumulated in float64 (of a sparse tensor's stored values: the
    gradient of nn.Embedding(sparse=True))."""
    if t.layout == torch.sparse_coo:
        t = t.coalesce().values()
    if t.dtype == torch.float64:
        return float(torch.linalg.vector_norm(t.detach()))
    total = 0.0
    for b in _blocks(t):
        total += float(torch.linalg.vector_norm(b)) ** 2
    return math.sqrt(total)


def moments64(t: torch.Tensor) -> tuple[float, float]:
    """Mean and population variance of every element, in float64 (centered two-pass)."""
    n = t.numel()
    if n == 0:
        return math.nan, math.nan
    mean = sum(float(b.sum()) for b in _blocks(t)) / n
    if not math.isfinite(mean):
        return mean, math.nan
    m2 = sum(float(b.sub_(mean).square_().sum()) for b in _blocks(t))
    return mean, m2 / n


def nonfinite_count(t: torch.Tensor) -> int:
    """Elements that are NaN or infinite (float8 e4m3fn has no isfinite kernel)."""
    return sum(int((~torch.isfinite(b)).sum()) for b in _blocks(t))


def mantissa_bits(dtype: torch.dtype) -> int:
    """Explicit mantissa bits: eps = 2**-bits (bfloat16 7, float16 10, e4m3 3, e5m2 2)."""
    return max(round(-math.log2(torch.finfo(dtype).eps)), 0)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=16)
def _grid(dtype: torch.dtype) -> np.ndarray | None:
    """Every finite value of a <= 16-bit float dtype, sorted and unique; None if wider."""
    bits = torch.finfo(dtype).bits
    if bits > 16:
        return None
    carrier = torch.uint8 if bits == 8 else torch.int16
    codes = torch.arange(2**bits, dtype=torch.int32).to(carrier).view(dtype)
    values = codes.to(torch.float64).numpy()
    return np.unique(values[np.isfinite(values)])


def _bin_masses(grid: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Probability of each grid value under round-to-nearest of N(0, sigma^2) and of the
    uniform law with the same variance."""
    from scipy.special import ndtr

    edges = np.concatenate([[-np.inf], (grid[1:] + grid[:-1]) / 2, [np.inf]])
    gauss = np.diff(ndtr(edges / sigma))
    a = sigma * math.sqrt(3.0)
    uniform = np.diff(np.clip(edges, -a, a)) / (2 * a)
    return gauss, uniform


def collision_probability(dtype: torch.dtype, sigma: float, rtol: float = 0.0) -> float:
    """Chance that two independent random values of spread ``sigma`` are equal once
    stored in ``dtype`` (or within ``rtol`` of each other, relative to the larger).

    The law is taken as zero-mean Gaussian or uniform (the two random inits), whichever
    collides more. For 8- and 16-bit floats it is summed exactly over the dtype's values
    (subnormals and zero included: a small spread in float8 lands on a few values); for
    float32/float64 the spacing is |x| * 2**-mantissa, which gives 2**-(bits+2) for the
    uniform law independently of sigma. ``sigma`` 0: the values are not random, 1.0.
    """
    if not sigma > 0 or not math.isfinite(sigma):
        return 1.0
    tolerance = rtol / 2.0  # two uniform values within rtol * max(|a|, |b|)
    grid = _grid(dtype)
    if grid is None:
        return max(2.0 ** -(mantissa_bits(dtype) + 2), tolerance)
    gauss, uniform = _bin_masses(grid, sigma)
    exact = max(float(np.square(gauss).sum()), float(np.square(uniform).sum()))
    return min(max(exact, tolerance), 1.0)
