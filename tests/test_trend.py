"""The depth-trend fit against sequences whose answer is known exactly."""

from __future__ import annotations

import pytest

from nnhealth.analyzers._trend import describe, envelope_fit, fit, project, verdict


def geometric(
    start: float, factor: float, n: int, prefix: str = "l"
) -> list[tuple[str, float, bool]]:
    return [(f"{prefix}{i}", start * factor**i, False) for i in range(n)]


def test_exact_geometric_sequence() -> None:
    t = fit(geometric(1.0, 0.05, 5))
    assert t.factor == pytest.approx(0.05, rel=1e-12)
    assert t.total == pytest.approx(0.05**4, rel=1e-12)
    assert (t.depth, t.runs, t.first_name, t.last_name) == (5, 1, "l0", "l4")
    assert verdict(t, min_depth=3, warn_ratio=100) == "vanishing"


def test_one_outlier_does_not_move_the_fit() -> None:
    pts = geometric(1.0, 6.0, 6)
    pts[0] = ("head", 1e-3, False)  # the output head: a different regime
    assert fit(pts).factor == pytest.approx(6.0, rel=1e-9)


def test_normalization_resets_runs() -> None:
    # each run shrinks x0.1 per layer, but a norm layer restores the scale between runs
    pts = geometric(1.0, 0.1, 3, "a") + [
        (n, v, i == 0) for i, (n, v, _) in enumerate(geometric(1.0, 0.1, 3, "b"))
    ]
    t = fit(pts)
    assert t.factor == pytest.approx(0.1) and t.runs == 2 and t.depth == 3


def test_runs_of_one_layer_give_no_trend() -> None:
    pts = [(f"l{i}", 10.0**-i, True) for i in range(6)]  # a norm layer before every layer
    assert fit(pts) is None
    assert verdict(None, 3, 100) == "healthy"


def test_shallow_stack_is_not_judged() -> None:
    t = fit(geometric(1.0, 0.01, 2))
    assert verdict(t, min_depth=3, warn_ratio=100) == "healthy"


def test_exact_zero_is_reported_not_fitted() -> None:
    pts = [("a", 1.0, False), ("b", 0.0, False), ("c", 0.0, False)]
    t = fit(pts)
    assert t.zeros == ("b", "c")
    assert verdict(t, 3, 100) == "vanishing"


def test_flat_is_healthy_and_growth_is_exploding() -> None:
    assert verdict(fit(geometric(1.0, 1.0, 8)), 3, 100) == "healthy"
    assert verdict(fit(geometric(1.0, 3.0, 6)), 3, 100) == "exploding"


def test_envelope_of_a_chain_is_the_plain_fit() -> None:
    """A chain that shrinks (or grows) at every layer is its own envelope."""
    for factor in (0.05, 7.0):
        pts = geometric(1.0, factor, 6)
        t = envelope_fit(pts)
        assert t.factor == pytest.approx(factor, rel=1e-12)
        assert t.total == pytest.approx(factor**5, rel=1e-12)


def test_small_branches_beside_a_live_path_are_not_depth() -> None:
    """From the output back: path, branch 1e-12 of it, path, branch, ...: flat."""
    pts = [(f"l{i}", 1.0 if i % 2 == 0 else 1e-12, False) for i in range(10)]
    t = envelope_fit(pts)
    assert t.factor == pytest.approx(1.0) and verdict(t, 3, 100) == "healthy"


def test_envelope_still_sees_vanishing_past_a_branch() -> None:
    """A chain losing x0.1 per layer, with a small branch near the output: vanishing."""
    pts = geometric(1.0, 0.1, 6)
    pts.insert(1, ("branch", 1e-9, False))
    t = envelope_fit(pts)
    assert verdict(t, 3, 100) == "vanishing" and t.factor == pytest.approx(0.1, rel=0.5)


def test_envelope_runs_and_zeros() -> None:
    runs = geometric(1.0, 0.1, 3, "a") + [
        (n, v, i == 0) for i, (n, v, _) in enumerate(geometric(5.0, 0.1, 3, "b"))
    ]
    t = envelope_fit(runs)
    assert t.runs == 2 and t.factor == pytest.approx(0.1)
    z = envelope_fit([("a", 1.0, False), ("b", 0.0, False), ("c", 0.5, False)])
    assert z.zeros == ("b",)
    assert envelope_fit([("a", 1.0, False)]) is None


def test_projection_over_a_whole_stack() -> None:
    """Segments of one shape (own offsets) share the slope; the total spans every point."""
    pts = geometric(1.0, 1.5, 4, "a") + [
        (n, v, i == 0) for i, (n, v, _) in enumerate(geometric(40.0, 1.5, 4, "b"))
    ]
    t = project(envelope_fit(pts), pts)
    assert t.factor == pytest.approx(1.5, rel=1e-12)
    assert t.total == pytest.approx(1.5**7, rel=1e-12)
    assert (t.depth, t.first_name, t.last_name) == (8, "a0", "b3")
    assert verdict(t, 6, 10) == "exploding" and verdict(t, 9, 10) == "healthy"
    assert "x17.1 in all (1 at a0, 135 at b3)" in describe(t, "s", "layer", ends=True)
