"""Groups of (near-)identical rows in linear time after one sort. numpy only.

Rows are sorted by their projection on a random unit vector. Two rows within distance
t of each other have projections within t (Cauchy-Schwarz), so each row is compared
only with the group leaders whose projection lies within the tolerance window behind
it: random rows give windows of about one leader, a constant layer a single leader,
and the cost is O(n log n) for the sort plus O(n * d) for the comparisons. Rows alone
in their window are set aside first, without a Python step each.
"""

from __future__ import annotations

from collections import deque

import numpy as np


def near_duplicate_groups(rows: np.ndarray, rtol: float, seed: int = 0) -> list[list[int]]:
    """Groups (size >= 2) of row indices whose rows lie within ``rtol`` of a group leader.

    Two rows i, j are near-identical when ||r_i - r_j|| <= rtol * max(||r_i||, ||r_j||)
    (rtol = 0: exactly equal). Each group is a leader and the rows close to it.
    """
    rows = np.asarray(rows)
    if rows.dtype not in (np.float32, np.float64):
        rows = rows.astype(np.float64)
    n = rows.shape[0]
    if n < 2:
        return []
    rows = rows.reshape(n, -1)
    direction = np.random.default_rng(seed).standard_normal(rows.shape[1])
    direction /= np.linalg.norm(direction)
    # norms and projections in float64, a block of rows at a time (no float64 copy of a
    # whole large layer); the window then only needs a float64 rounding margin
    norms = np.empty(n)
    proj = np.empty(n)
    for start in range(0, n, 2048):
        block = rows[start : start + 2048].astype(np.float64)
        norms[start : start + 2048] = np.sqrt(np.einsum("ij,ij->i", block, block))
        proj[start : start + 2048] = block @ direction
    # a row holding NaN/Inf is no one's copy (its distances are NaN or Inf, and an Inf
    # norm would make every row "within rtol" of it): NH001 reports it
    finite = np.isfinite(norms) & np.isfinite(proj)
    if finite.sum() < 2:
        return []
    order = np.argsort(proj, kind="stable")
    order = order[finite[order]]
    window = (rtol + 1e-12) * float(norms[finite].max())
    # a row with no other within the window (in projection) joins no group and leads
    # none: only the others go through the loop below (random rows: usually none)
    close = np.diff(proj[order]) <= window
    paired = np.zeros(order.size, dtype=bool)
    paired[1:] |= close
    paired[:-1] |= close
    order = order[paired]
    leaders: deque[int] = deque()
    members: dict[int, list[int]] = {}
    for idx in order:
        p = proj[idx]
        while leaders and p - proj[leaders[0]] > window:
            leaders.popleft()
        row, norm = rows[idx], norms[idx]
        for lead in leaders:
            limit = rtol * max(norm, norms[lead])
            diff = (row - rows[lead]).astype(np.float64)
            if float(np.sqrt(diff @ diff)) <= limit:
                members[lead].append(int(idx))
                break
        else:
            leaders.append(int(idx))
            members[int(idx)] = [int(idx)]
    return sorted((sorted(g) for g in members.values() if len(g) > 1), key=lambda g: g[0])
