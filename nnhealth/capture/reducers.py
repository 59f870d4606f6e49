"""Per-site statistics, each one small reducer: ``update`` while the pass runs,
``freeze`` into ``SiteStats`` fields (numpy or plain Python, no tensors) at the end.

The plan switches them on (``switched_on``): moments and dead units come with the
activations, saturation counts with a saturation request, fingerprints with a
fingerprint request, gradient moments with the backward pass. A site holds the
reducers that apply to it (``wanted``); a new statistic is one class here, listed in
``OUTPUT_REDUCERS``, plus its fields in ``SiteStats``.

Each site is one call of one layer or nonlinearity, so each reducer sees one output (or
one gradient). Outputs are read as float32 (bfloat16/float16/float8 values exactly):
half-precision sums lose the small variances we report, and comparisons against the
saturation bounds must see the stored values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch

from nnhealth.capture.precision import exact32
from nnhealth.capture.stats import ACTIVATION, ActivationSpec, SiteStats

if TYPE_CHECKING:
    from nnhealth.plan import Plan

Probes = Callable[[tuple[int, ...], torch.Tensor], torch.Tensor]

_SITE_FIELDS = frozenset(f.name for f in fields(SiteStats))


class Output:
    """One site's output as the reducers read it: float32 values, the unit axis (the
    channel for channel-first layouts, else the last), and per-unit extremes computed
    once for whichever reducers ask."""

    def __init__(
        self,
        out: torch.Tensor,
        channel_first: bool,
        role: str,
        spec: ActivationSpec | None,
        probes: Probes,
    ) -> None:
        x = exact32(out.detach())
        if x.ndim <= 1:
            x = x.reshape(-1, 1)
        self.x = x
        self.unit_dim = 1 if (channel_first and x.ndim >= 3) else x.ndim - 1
        self.dims = tuple(d for d in range(x.ndim) if d != self.unit_dim)
        self.units = x.shape[self.unit_dim]
        self.per_unit_count = x.numel() // self.units
        self.role = role
        self.spec = spec
        self.probes = probes

    @property
    def exact_f32(self) -> bool:
        """float32 counts are exact below 2**24 values per unit."""
        return self.per_unit_count < 2**24

    @functools.cached_property
    def umax(self) -> torch.Tensor:
        return self.x.amax(dim=self.dims)

    @functools.cached_property
    def umin(self) -> torch.Tensor:
        return self.x.amin(dim=self.dims)


class Reducer:
    """One statistic of one site. ``fields``: the SiteStats fields ``freeze`` returns."""

    fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.fields) - _SITE_FIELDS
        if unknown:
            raise TypeError(f"{cls.__name__}: {sorted(unknown)} are not SiteStats fields")

    def freeze(self) -> dict[str, Any]:
        raise NotImplementedError


class OutputReducer(Reducer):
    """A statistic of a site's forward output."""

    @classmethod
    def enabled(cls, plan: Plan) -> bool:
        """Whether the plan switches this statistic on."""
        return plan.activations

    @classmethod
    def wanted(cls, out: Output) -> bool:
        """Whether this site gets one (a dead-unit count only for the ReLU family...)."""
        return True

    def update(self, out: Output) -> None:
        raise NotImplementedError


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _counts(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else np.nan_to_num(_numpy(t)).astype(np.int64).reshape(-1)


class Moments(OutputReducer):
    """Mean and population variance over every element; non-finite values counted
    when the moments are not finite."""

    fields = ("mean", "var", "nonfinite")

    def __init__(self) -> None:
        self.mean = self.var = math.nan
        self.nonfinite = 0

    def update(self, out: Output) -> None:
        mean, var = _moments(out.x)
        if not (math.isfinite(mean) and math.isfinite(var)):
            self.nonfinite = int((~torch.isfinite(out.x)).sum())
        self.mean = mean
        self.var = max(var, 0.0) if math.isfinite(var) else var

    def freeze(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "nonfinite": self.nonfinite}


class DeadUnits(OutputReducer):
    """ReLU family: whether each unit was ever active (its largest output > 0; the
    outputs are >= 0): a max-reduction, no mask, no temporary."""

    fields = ("ever_active",)

    def __init__(self) -> None:
        self.active: torch.Tensor | None = None

    @classmethod
    def enabled(cls, plan: Plan) -> bool:
        return plan.activations and plan.dead_units

    @classmethod
    def wanted(cls, out: Output) -> bool:
        return out.spec is not None and out.spec.can_die

    def update(self, out: Output) -> None:
        self.active = out.umax > 0

    def freeze(self) -> dict[str, Any]:
        return {"ever_active": None if self.active is None else _numpy(self.active).reshape(-1)}


class SaturatedValues(OutputReducer):
    """Per unit, the values in the nonlinearity's saturated region (y <= sat_lo or
    y >= sat_hi); for a hard nonlinearity that is also flat at 0 (ReLU6), the share
    of values above 0, which its mean derivative needs."""

    fields = ("saturated_count", "positive_fraction")

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None
        self.positive_fraction: float | None = None

    @classmethod
    def enabled(cls, plan: Plan) -> bool:
        return plan.activations and plan.saturation_derivative is not None

    @classmethod
    def wanted(cls, out: Output) -> bool:
        spec = out.spec
        return spec is not None and (spec.sat_lo is not None or spec.sat_hi is not None)

    def update(self, out: Output) -> None:
        spec = cast(ActivationSpec, out.spec)  # wanted(): not None
        if spec.can_die and spec.derivative == "hard":
            self.positive_fraction = float(torch.sign(out.x).sum()) / out.x.numel()
        self.count = _count_saturated(out.x, spec, out.dims, out.exact_f32)

    def freeze(self) -> dict[str, Any]:
        return {
            "saturated_count": _counts(self.count),
            "positive_fraction": self.positive_fraction,
        }


class Fingerprints(OutputReducer):
    """Per nonlinearity unit: two random zero-sum projections of its outputs, its min
    and max (units with equal fingerprints computed the same function of this batch),
    and for units with a near twin, the values strictly inside (min, max)."""

    fields = ("unit_fingerprint", "unit_interior")

    def __init__(self) -> None:
        self.fingerprint: torch.Tensor | None = None
        self.interior: torch.Tensor | None = None

    @classmethod
    def enabled(cls, plan: Plan) -> bool:
        return plan.activations and plan.fingerprints

    @classmethod
    def wanted(cls, out: Output) -> bool:
        return out.role == ACTIVATION

    def update(self, out: Output) -> None:
        umax, umin = out.umax, out.umin
        proj = _unit_projection(out.x, out.unit_dim, out.probes)
        self.fingerprint = torch.cat([proj, umin[:, None], umax[:, None]], dim=1)
        self.interior = _interior(out.x, out.unit_dim, out.dims, umin, umax, proj)

    def freeze(self) -> dict[str, Any]:
        fp = None if self.fingerprint is None else _numpy(self.fingerprint).astype(np.float64)
        return {"unit_fingerprint": fp, "unit_interior": _counts(self.interior)}


# every statistic of a forward output, in the order they are updated
OUTPUT_REDUCERS: tuple[type[OutputReducer], ...] = (
    Moments,
    DeadUnits,
    SaturatedValues,
    Fingerprints,
)


def switched_on(plan: Plan) -> tuple[type[OutputReducer], ...]:
    """The output statistics the plan asks for."""
    return tuple(r for r in OUTPUT_REDUCERS if r.enabled(plan))


class GradientMoments(Reducer):
    """Moments of the gradient w.r.t. a site's output (the backward reaches it once),
    and the order in which the backward reached it."""

    fields = ("grad_count", "grad_mean", "grad_m2", "grad_nonfinite", "grad_order")

    def __init__(self) -> None:
        self.count = 0
        self.mean: float | None = None
        self.m2: float | None = None
        self.nonfinite = 0
        self.order: int | None = None

    def update(self, grad: torch.Tensor, order: int) -> None:
        g = exact32(grad.detach())  # a bfloat16 sum of squares is badly wrong
        n = g.numel()
        mean, var = _moments(g)
        m2 = var * n
        if not math.isfinite(m2):
            self.nonfinite += int((~torch.isfinite(g)).sum())
        self.count, self.mean, self.m2 = n, mean, m2
        if self.order is None:
            self.order = order

    def freeze(self) -> dict[str, Any]:
        return {
            "grad_count": self.count,
            "grad_mean": self.mean,
            "grad_m2": self.m2,
            "grad_nonfinite": self.nonfinite,
            "grad_order": self.order,
        }


# ---- numerics ---------------------------------------------------------------------

# Values per row of the sum of squares: a float32 accumulation over 1024 values loses
# ~1e-7 relative; one vector norm over millions of them loses 1e-4 (4M) to 4e-3 (32M).
_ROW = 1024
# E[x^2] - E[x]^2 loses about 1e-7 * (1 + mean^2 / var) relative; beyond this ratio
# (1e-7 * 31: a few 1e-6 at worst) the centered two-pass formula is used instead.
_CANCELLATION_RATIO = 30.0


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Every element of ``x`` as a 1-D view in memory order (a copy only if ``x`` has
    gaps or overlaps)."""
    if not x.is_contiguous():
        order = sorted(range(x.ndim), key=lambda d: -x.stride(d))
        permuted = x.permute(order)
        if permuted.is_contiguous():
            x = permuted
    return x.reshape(-1)


def _sum_squares(x: torch.Tensor) -> float:
    """Sum of x^2 over every element of a float32/float64 tensor: a vector norm per row of
    ``_ROW`` values (one reduction call, no temporary the size of ``x``), rows summed
    in float64."""
    flat = _flat(x)
    n = flat.numel()
    rows = n // _ROW
    total = 0.0
    if rows:
        norms = torch.linalg.vector_norm(flat[: rows * _ROW].view(rows, _ROW), dim=1)
        total = float(norms.double().square().sum())
    if n > rows * _ROW:
        total += float(torch.linalg.vector_norm(flat[rows * _ROW :].double())) ** 2
    return total


def _moments(x: torch.Tensor) -> tuple[float, float]:
    """Mean and population variance of every element of ``x`` (float32 or float64).

    One pass of reductions (cheap: no float64 copy of the activation; the sum is
    cascaded, the sum of squares taken by rows), falling back to the centered two-pass
    formula where the mean is so large against the spread that the one-pass difference
    E[x^2] - E[x]^2 would cancel.
    """
    n = x.numel()
    mean = float(x.sum()) / n
    second = _sum_squares(x) / n
    var = second - mean * mean
    if mean * mean > _CANCELLATION_RATIO * var:
        var = float((x - mean).square_().sum()) / n
    return mean, var


# Units whose fingerprints lie within this (relative) of another's get their values
# counted; the symmetry check's tolerance is 1e-6, this leaves it room up to 1e-4.
CANDIDATE_RTOL = 1e-4


def _interior(
    x: torch.Tensor,
    unit_dim: int,
    dims: tuple[int, ...],
    umin: torch.Tensor,
    umax: torch.Tensor,
    proj: torch.Tensor,
) -> torch.Tensor:
    """Per unit, the values strictly between its min and max, #(x > min) - #(x == max),
    for the units that may have a twin; -1 for the others (not counted).

    A ReLU's zeros and a saturated unit's bound are shared by many units; what can tell
    two units apart is the rest. The symmetry check weighs a group of equal units by it.
    Counting every unit would cost two comparisons and two boolean reductions over the
    whole activation; twins have near-equal projections, so only the units with another
    unit within ``CANDIDATE_RTOL`` of the largest projection norm in both projections
    are counted (usually none: ``_near``).
    """
    count = torch.full(umin.shape, -1, dtype=torch.int64, device=x.device)
    live = torch.nonzero(umax > umin).reshape(-1)
    if live.numel() < 2:
        return count
    p = proj[live].double()
    window = CANDIDATE_RTOL * float(torch.linalg.vector_norm(p, dim=1).max())
    order = torch.argsort(p[:, 0])
    chosen = live[order[_near(p[order], window)]]
    if chosen.numel() == 0:
        return count
    xs = x.index_select(unit_dim, chosen)
    shape = [1] * x.ndim
    shape[unit_dim] = -1
    inside = (xs > umin[chosen].reshape(shape)).sum(dim=dims)
    inside -= (xs >= umax[chosen].reshape(shape)).sum(dim=dims)
    count[chosen] = inside.clamp_(min=0)
    return count


# Sorted neighbours compared one offset at a time, up to this many; a run of units
# closer in the first projection than that is counted whole.
_NEIGHBOURS = 16


def _near(p: torch.Tensor, window: float) -> torch.Tensor:
    """Rows of ``p`` (sorted by column 0) with another row within ``window`` in both
    columns: each pair within the window in column 0 lies within _NEIGHBOURS places in the
    order, or inside a run of more than that many rows, all taken as near."""
    n = p.shape[0]
    near = torch.zeros(n, dtype=torch.bool, device=p.device)
    for k in range(1, min(_NEIGHBOURS, n - 1) + 1):
        first = p[k:, 0] - p[:-k, 0] <= window
        if not bool(first.any()):
            return near
        pair = first & ((p[k:, 1] - p[:-k, 1]).abs() <= window)
        near[k:] |= pair
        near[:-k] |= pair
    k = _NEIGHBOURS + 1
    if n > k:
        run = p[k:, 0] - p[:-k, 0] <= window  # pairs further apart than _NEIGHBOURS
        near[k:] |= run
        near[:-k] |= run
    return near


def _unit_projection(x: torch.Tensor, unit_dim: int, probes: Probes) -> torch.Tensor:
    """Each unit's outputs over the batch (and positions) projected on two random
    zero-sum vectors, by matrix products (no temporary the size of ``x``): (units, 2).

    Zero-sum vectors cancel a unit's constant part, so units that differ only slightly
    around a large common value (saturated ones) still get clearly different projections;
    identical units get identical ones.
    """
    if unit_dim == x.ndim - 1:
        flat = x.reshape(-1, x.shape[-1])  # (values per unit, units)
        # (2, values) @ (values, units): a wide product; flat.T @ probes is ~40x slower on CPU
        return (probes((flat.shape[0], 2), x).T @ flat).T
    flat = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, positions), unit_dim == 1
    return torch.bmm(flat, probes((x.shape[0], flat.shape[2], 2), x)).sum(dim=0)


def _count_saturated(
    x: torch.Tensor, spec: ActivationSpec, dims: tuple[int, ...], exact_f32: bool
) -> torch.Tensor:
    """Per-unit count of values with y <= sat_lo or y >= sat_hi, with one float temporary.

    The region is written as d >= 0 (d = |y - centre| - half-width for two bounds), and
    sign(d) + 1 clamped to 1 is 1 exactly where d >= 0, bounds included (hard variants
    sit exactly on them).
    """
    lo, hi = spec.sat_lo, spec.sat_hi
    if not exact_f32:
        mask = (x >= hi) if hi is not None else torch.zeros_like(x, dtype=torch.bool)
        if lo is not None:
            mask |= x <= lo
        return mask.sum(dim=dims)
    if lo is not None and hi is not None:
        d = (x - (lo + hi) / 2).abs_().sub_((hi - lo) / 2)
    elif hi is not None:
        d = x - hi
    else:
        d = lo - x
    return d.sign_().add_(1).clamp_(max=1).sum(dim=dims)
