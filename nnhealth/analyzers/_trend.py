"""Geometric trend of a positive quantity through depth, reset at normalization layers.

Var(s_k) = [n Var(w)]^k Var(x) for a stack of plain layers (DOMAIN.md), so log-variance
is linear in depth and its slope is the per-layer growth factor (fitted robustly, as
the median of pairwise slopes). A BatchNorm/LayerNorm
between two layers rescales the signal, so the trend is fitted within the runs of
layers between normalization layers (one shared slope, each run with its own offset),
and the total change is taken over the longest run.

``envelope_fit`` is for a scale-free quantity measured at every layer of a network with
branches (residual blocks, attention): it fits the running maximum from each end, so
that a branch whose output is small by design (layer scale 1e-6, attention logits
near 0 at init) does not pass for depth, while a chain that really loses (or gains)
signal layer after layer still shows the same trend as ``fit``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# A variance of exactly zero carries no signal at all; log needs a floor.
_FLOOR = 1e-45


@dataclass(frozen=True)
class Trend:
    factor: float  # fitted growth per layer (1 = flat)
    total: float  # factor ** (longest run - 1)
    depth: int  # layers in the longest run
    runs: int  # runs of two or more layers used for the fit
    first: float  # the largest and smallest value of the longest run, in depth order:
    last: float  # (largest first when vanishing, smallest first when exploding)
    first_name: str
    last_name: str
    zeros: tuple[str, ...] = ()  # points whose value is exactly 0: no signal at all


def fit(points: list[tuple[str, float, bool]]) -> Trend | None:
    """``points``: (name, value, starts_new_run) in depth order.

    Returns None when no run has two or more layers.
    """
    runs: list[list[tuple[str, float]]] = []
    zeros = tuple(name for name, value, _ in points if value == 0)
    for name, value, new_run in points:
        if value is None or not math.isfinite(value):
            new_run = True  # a non-finite value breaks the chain (NH001 reports it)
            if runs and runs[-1]:
                runs.append([])
            continue
        if new_run or not runs:
            runs.append([])
        runs[-1].append((name, value))
    runs = [r for r in runs if len(r) >= 2]
    if not runs:
        return None
    if zeros:
        # the trend through an exact zero is meaningless: report the zeros themselves
        zeros_run = max(runs, key=len)
        return Trend(
            0.0,
            0.0,
            len(zeros_run),
            len(runs),
            zeros_run[0][1],
            zeros_run[-1][1],
            zeros_run[0][0],
            zeros_run[-1][0],
            zeros,
        )
    # Theil-Sen: the median of the slopes between every pair of layers of the same run.
    # Robust to one odd layer (the output head, whose backward gain depends on the number
    # of classes), and each run keeps its own offset.
    slopes = [
        (math.log(max(b[1], _FLOOR)) - math.log(max(a[1], _FLOOR))) / (j - i)
        for run in runs
        for i, a in enumerate(run)
        for j, b in enumerate(run)
        if j > i
    ]
    slope = statistics.median(slopes)
    longest = max(runs, key=len)
    lo = min(range(len(longest)), key=lambda i: longest[i][1])
    hi = max(range(len(longest)), key=lambda i: longest[i][1])
    a, b = (hi, lo) if slope < 0 else (lo, hi)
    return Trend(
        factor=math.exp(slope),
        total=math.exp(slope * (len(longest) - 1)),
        depth=len(longest),
        runs=len(runs),
        first=longest[a][1],
        last=longest[b][1],
        first_name=longest[a][0],
        last_name=longest[b][0],
    )


def _running_max(values: list[float]) -> list[float]:
    out, top = [], -math.inf
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


def envelope_fit(points: list[tuple[str, float, bool]]) -> Trend | None:
    """``points``: (name, value, starts_new_run) from the output back to the input.

    Within each run, vanishing towards the input is judged on a_k = max(v_j, j >= k):
    the most a site at depth k or nearer the input still gets; exploding on
    b_k = max(v_j, j <= k): the most a site at depth k or nearer the output gets. A
    chain that shrinks has a = v, so its fit is ``fit``'s; a small branch next to a
    live path is hidden by the path's larger value on the side that matters. Of the
    two, the trend further from flat is returned (factor < 1: vanishing, > 1:
    exploding).
    """
    pts = [(n, v, new) for n, v, new in points if v is not None and math.isfinite(v)]
    if any(v == 0 for _, v, _ in pts):
        return fit(pts)
    runs: list[list[tuple[str, float]]] = []
    for name, value, new_run in pts:
        if new_run or not runs:
            runs.append([])
        runs[-1].append((name, value))
    vanish: list[tuple[str, float, bool]] = []
    explode: list[tuple[str, float, bool]] = []
    for run in runs:
        values = [v for _, v in run]
        toward_input = _running_max(values[::-1])[::-1]
        toward_output = _running_max(values)
        for i, (name, _) in enumerate(run):
            vanish.append((name, toward_input[i], i == 0))
            explode.append((name, toward_output[i], i == 0))
    trends = [t for t in (fit(vanish), fit(explode)) if t is not None]
    return max(trends, key=lambda t: abs(math.log(t.factor)), default=None)


def project(trend: Trend, points: list[tuple[str, float, bool]]) -> Trend:
    """``trend``'s per-layer factor projected over every one of ``points`` (from the
    output back), not only its longest run: the change over the whole depth, with the
    two ends (output end first)."""
    (first_name, first, _), (last_name, last, _) = points[0], points[-1]
    return Trend(
        factor=trend.factor,
        total=trend.factor ** (len(points) - 1),
        depth=len(points),
        runs=trend.runs,
        first=first,
        last=last,
        first_name=first_name,
        last_name=last_name,
    )


def verdict(trend: Trend | None, min_depth: int, warn_ratio: float) -> str:
    """'vanishing', 'exploding' or 'healthy' (also when there is too little depth to judge)."""
    if trend is not None and trend.zeros:
        return "vanishing"
    if trend is None or trend.depth < min_depth:
        return "healthy"
    if trend.total <= 1.0 / warn_ratio:
        return "vanishing"
    if trend.total >= warn_ratio:
        return "exploding"
    return "healthy"


def is_error(trend: Trend, error_ratio: float) -> bool:
    return bool(trend.zeros) or trend.total <= 1.0 / error_ratio or trend.total >= error_ratio


def describe(trend: Trend, what: str, unit: str, ends: bool = False) -> str:
    """The numbers of a trend in words, for a finding's message; ``ends``: name the two
    ends of a ``project``-ed trend (output end first) instead of its extremes."""
    if trend.zeros:
        shown = ", ".join(trend.zeros[:4]) + (" ..." if len(trend.zeros) > 4 else "")
        return f"{what} is exactly 0 at {len(trend.zeros)} {unit}(s) ({shown}): no signal passes"
    if ends:
        return (
            f"{what} changes x{trend.factor:.3g} per {unit} over {trend.depth} {unit}s, "
            f"x{trend.total:.3g} in all ({trend.first:.3g} at {trend.first_name}, "
            f"{trend.last:.3g} at {trend.last_name})"
        )
    largest, smallest = (
        ((trend.first, trend.first_name), (trend.last, trend.last_name))
        if trend.factor < 1
        else ((trend.last, trend.last_name), (trend.first, trend.first_name))
    )
    return (
        f"{what} changes x{trend.factor:.3g} per {unit} over {trend.depth} {unit}s, "
        f"x{trend.total:.3g} in all (largest {largest[0]:.3g} at {largest[1]}, smallest "
        f"{smallest[0]:.3g} at {smallest[1]})"
    )


def evidence(
    trend: Trend, verdict: str, quantity: str = "variance"
) -> dict[str, float | int | str]:
    """The numbers of a trend finding: per-layer factor, total change, and its ends."""
    big, small = ("largest", "smallest") if verdict == "vanishing" else ("smallest", "largest")
    return {
        "verdict": verdict,
        "factor_per_layer": trend.factor,
        "total_ratio": trend.total,
        "depth": trend.depth,
        f"{big}_{quantity}": trend.first,
        f"{small}_{quantity}": trend.last,
    }
