"""Each reducer against a brute-force numpy computation on small tensors.

Tolerances: moments and projections are float32 reductions of the same values, checked
against float64 to 1e-5 relative (projections: 1e-5 of the largest one); counts, flags,
minima and maxima exactly. Inputs in bfloat16 are compared with the float64 values of
the same bfloat16 numbers (they are exact in float32).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnhealth.capture.reducers import (
    CANDIDATE_RTOL,
    OUTPUT_REDUCERS,
    DeadUnits,
    Fingerprints,
    GradientMoments,
    Moments,
    Output,
    OutputReducer,
    SaturatedValues,
    _count_saturated,
    _near,
    switched_on,
)
from nnhealth.capture.stats import ACTIVATION, LAYER, ActivationSpec
from nnhealth.plan import Plan

RTOL = 1e-5
TANH = ActivationSpec("tanh", sat_lo=-0.9, sat_hi=0.9, derivative="tanh")
RELU = ActivationSpec("relu", can_die=True)
RELU6 = ActivationSpec("relu6", can_die=True, sat_hi=6.0, derivative="hard")


class Probes:
    """Zero-sum probe vectors like the recorder's, remembered for the brute force."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.made: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if shape not in self.made:
            r = torch.randn(shape, generator=self.gen, dtype=like.dtype)
            self.made[shape] = r - r.reshape(-1, shape[-1]).mean(dim=0)
        return self.made[shape]


def values(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def layouts() -> list[tuple[str, torch.Tensor, bool]]:
    """(id, tensor, channel_first): contiguous, channels-last, transposed and strided
    views of float32 and bfloat16 values."""
    nchw = values((6, 4, 3, 5), seed=1)
    nlc = values((5, 7, 4), seed=2)
    return [
        ("nc", values((9, 5), seed=3), False),
        ("nchw", nchw, True),
        ("nchw-channels-last", nchw.contiguous(memory_format=torch.channels_last), True),
        ("nchw-bfloat16", nchw.to(torch.bfloat16), True),
        ("nlc-transposed", nlc.transpose(0, 1), False),
        ("nc-strided", values((8, 10), seed=4)[:, ::2], False),
        ("nc-bfloat16", values((12, 6), seed=5).to(torch.bfloat16), False),
    ]


LAYOUTS = layouts()
IDS = [name for name, _, _ in LAYOUTS]


def by_unit(t: torch.Tensor, channel_first: bool) -> np.ndarray:
    """float64 values as (values per unit, units): the brute force's view."""
    a = t.detach().to(torch.float64).numpy()
    axis = 1 if channel_first and a.ndim >= 3 else a.ndim - 1
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def output(t: torch.Tensor, channel_first: bool, spec=None, probes=None) -> Output:
    return Output(t, channel_first, ACTIVATION, spec, probes or Probes())


def reduced(cls: type[OutputReducer], out: Output) -> dict:
    reducer = cls()
    reducer.update(out)
    frozen = reducer.freeze()
    assert set(frozen) == set(cls.fields)
    assert not any(isinstance(v, torch.Tensor) for v in frozen.values())
    return frozen


@pytest.mark.parametrize(("name", "t", "channel_first"), LAYOUTS, ids=IDS)
def test_output_reads_units_on_the_right_axis(name: str, t: torch.Tensor, channel_first) -> None:
    out = output(t, channel_first)
    a = by_unit(t, channel_first)
    assert out.x.dtype == torch.float32
    assert (out.units, out.per_unit_count) == (a.shape[1], a.shape[0])
    np.testing.assert_array_equal(out.umax.numpy(), a.max(axis=0))
    np.testing.assert_array_equal(out.umin.numpy(), a.min(axis=0))


@pytest.mark.parametrize(("name", "t", "channel_first"), LAYOUTS, ids=IDS)
def test_moments(name: str, t: torch.Tensor, channel_first: bool) -> None:
    got = reduced(Moments, output(t, channel_first))
    a = t.to(torch.float64).numpy()
    assert got["mean"] == pytest.approx(float(a.mean()), rel=RTOL, abs=1e-9)
    assert got["var"] == pytest.approx(float(a.var()), rel=RTOL)
    assert got["nonfinite"] == 0


def test_moments_of_a_large_mean_use_the_centered_formula() -> None:
    t = 1000.0 + values((64, 8), seed=6, scale=1e-2)
    got = reduced(Moments, output(t, False))
    # E[x^2] - E[x]^2 in float32 would be off by ~1e6 * 1e-7, a thousand times the var
    assert got["var"] == pytest.approx(float(t.double().var(unbiased=False)), rel=1e-3)


def test_moments_count_nonfinite_values() -> None:
    t = values((6, 5), seed=7)
    t[1, 2], t[4, 0], t[5, 4] = math.inf, math.nan, -math.inf
    got = reduced(Moments, output(t, False))
    assert got["nonfinite"] == 3 and not math.isfinite(got["mean"])


@pytest.mark.parametrize(("name", "t", "channel_first"), LAYOUTS, ids=IDS)
def test_dead_units(name: str, t: torch.Tensor, channel_first: bool) -> None:
    relu = torch.relu(t - 0.8)  # some units never positive
    got = reduced(DeadUnits, output(relu, channel_first, RELU))
    expected = (by_unit(relu, channel_first) > 0).any(axis=0)
    np.testing.assert_array_equal(got["ever_active"], expected)
    assert got["ever_active"].dtype == np.bool_


def test_dead_units_only_for_nonlinearities_that_can_die() -> None:
    t = values((4, 3))
    assert DeadUnits.wanted(output(t, False, RELU))
    assert not DeadUnits.wanted(output(t, False, TANH))
    assert not DeadUnits.wanted(output(t, False, None))


@pytest.mark.parametrize(("name", "t", "channel_first"), LAYOUTS, ids=IDS)
def test_saturated_values_two_bounds(name: str, t: torch.Tensor, channel_first: bool) -> None:
    y = torch.tanh(2 * t)
    got = reduced(SaturatedValues, output(y, channel_first, TANH))
    a = by_unit(y, channel_first)
    np.testing.assert_array_equal(got["saturated_count"], ((a <= -0.9) | (a >= 0.9)).sum(0))
    assert got["positive_fraction"] is None


@pytest.mark.parametrize(("name", "t", "channel_first"), LAYOUTS, ids=IDS)
def test_saturated_values_relu6(name: str, t: torch.Tensor, channel_first: bool) -> None:
    y = torch.nn.functional.relu6(5 * t)  # exactly 0 and exactly 6 on many values
    got = reduced(SaturatedValues, output(y, channel_first, RELU6))
    a = by_unit(y, channel_first)
    np.testing.assert_array_equal(got["saturated_count"], (a >= 6.0).sum(0))
    assert got["positive_fraction"] == pytest.approx(float((a > 0).mean()), rel=1e-12)


@pytest.mark.parametrize("spec", [TANH, RELU6, ActivationSpec("x", sat_lo=-0.5)], ids=str)
def test_saturated_counts_agree_with_the_mask_path(spec: ActivationSpec) -> None:
    """Above 2**24 values per unit the counts take a boolean mask (float32 sums stop
    being exact there); both paths count the same values."""
    x = values((40, 6), seed=8, scale=4.0).clamp(-6, 6)
    x[0, :] = 6.0  # exactly on a bound
    exact = _count_saturated(x, spec, (0,), True)
    masked = _count_saturated(x, spec, (0,), False)
    np.testing.assert_array_equal(exact.numpy(), masked.numpy())
    lo = -math.inf if spec.sat_lo is None else spec.sat_lo
    hi = math.inf if spec.sat_hi is None else spec.sat_hi
    np.testing.assert_array_equal(masked.numpy(), ((x <= lo) | (x >= hi)).sum(0).numpy())


def test_saturated_values_only_where_there_are_bounds() -> None:
    t = values((4, 3))
    assert SaturatedValues.wanted(output(t, False, TANH))
    assert SaturatedValues.wanted(output(t, False, RELU6))
    assert not SaturatedValues.wanted(output(t, False, RELU))


@pytest.mark.parametrize(("name", "t", "channel_first"), LAYOUTS, ids=IDS)
def test_fingerprints(name: str, t: torch.Tensor, channel_first: bool) -> None:
    probes = Probes()
    got = reduced(Fingerprints, output(t, channel_first, probes=probes))
    a = by_unit(t, channel_first)
    (p,) = probes.made.values()
    p = p.double().numpy()
    if channel_first:  # (N, positions, 2): position by position
        n = t.shape[0]
        per_example = np.moveaxis(t.double().numpy(), 1, -1).reshape(n, -1, a.shape[1])
        proj = np.einsum("npc,npk->ck", per_example, p)
    else:
        proj = a.T @ p
    fp = got["unit_fingerprint"]
    assert fp.dtype == np.float64 and fp.shape == (a.shape[1], 4)
    np.testing.assert_allclose(fp[:, :2], proj, rtol=RTOL, atol=RTOL * np.abs(proj).max())
    np.testing.assert_array_equal(fp[:, 2], a.min(0))
    np.testing.assert_array_equal(fp[:, 3], a.max(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_interior_counted_for_twins_only(dtype: torch.dtype) -> None:
    """Units 1 and 4 are copies of unit 0 (ReLU outputs: many zeros shared by chance);
    their values strictly inside (min, max) are counted, the others are -1."""
    x = torch.relu(values((30, 6), seed=9)).to(dtype)
    x[:, 1] = x[:, 0]
    x[:, 4] = x[:, 0]
    got = reduced(Fingerprints, output(x, False))
    a = by_unit(x, False)
    inside = ((a > a.min(0)) & (a < a.max(0))).sum(0)
    twins = [0, 1, 4]
    np.testing.assert_array_equal(got["unit_interior"][twins], inside[twins])
    assert (got["unit_interior"][[2, 3, 5]] == -1).all()
    assert got["unit_interior"].dtype == np.int64
    assert CANDIDATE_RTOL < 1e-3  # the random units' projections are far apart


def test_interior_of_a_wide_layer_counts_its_twins_alone() -> None:
    """3000 units over 40 values: many are close in the first projection alone (the
    candidates once were a third of them); only the twins are close in both."""
    x = torch.nn.functional.gelu(values((40, 3000), seed=11))
    x[:, 7] = x[:, 2000]
    got = reduced(Fingerprints, output(x, False))
    assert np.flatnonzero(got["unit_interior"] >= 0).tolist() == [7, 2000]


def brute_near(p: np.ndarray, window: float) -> np.ndarray:
    diff = np.abs(p[:, None, :] - p[None, :, :]).max(axis=2)
    np.fill_diagonal(diff, np.inf)
    return (diff <= window).any(axis=1)


@pytest.mark.parametrize("seed", range(5))
def test_near_rows_against_all_pairs(seed: int) -> None:
    """Rows with another within the window in both columns: exactly the brute force's
    when no run of rows closer than the window in column 0 is longer than the
    comparisons reach; a superset of it (a long run taken whole) when one is."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((400, 2))
    p[rng.integers(0, 400, 20)] = p[rng.integers(0, 400, 20)] + 1e-4
    window = 2e-3
    p = p[np.argsort(p[:, 0], kind="stable")]
    got = _near(torch.from_numpy(p), window).numpy()
    np.testing.assert_array_equal(got, brute_near(p, window))
    run = np.concatenate([p, np.stack([np.linspace(5, 5 + 1e-3, 40), np.arange(40.0)], 1)])
    got = _near(torch.from_numpy(run), window).numpy()
    expected = brute_near(run, window)
    assert (got >= expected).all()
    assert got[-40:].all() and not expected[-40:].any()  # the run, taken whole


def test_fingerprints_only_for_nonlinearities() -> None:
    t = values((4, 3))
    assert Fingerprints.wanted(output(t, False))
    assert not Fingerprints.wanted(Output(t, False, LAYER, None, Probes()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_moments(dtype: torch.dtype) -> None:
    g = values((7, 3, 4), seed=10).to(dtype).transpose(1, 2)  # a non-contiguous view
    reducer = GradientMoments()
    reducer.update(g, 3)
    reducer.update(g, 8)  # a second arrival keeps the first order
    got = reducer.freeze()
    a = g.to(torch.float64).numpy()
    assert got["grad_count"] == a.size and got["grad_order"] == 3
    assert got["grad_mean"] == pytest.approx(float(a.mean()), rel=RTOL, abs=1e-9)
    assert got["grad_m2"] / a.size == pytest.approx(float(a.var()), rel=RTOL)
    assert got["grad_nonfinite"] == 0


def test_gradient_moments_count_nonfinite_values() -> None:
    g = values((5, 4), seed=11)
    g[0, 0], g[3, 1] = math.nan, math.inf
    reducer = GradientMoments()
    reducer.update(g, 0)
    assert reducer.freeze()["grad_nonfinite"] == 2


def test_unused_gradient_moments_freeze_to_the_record_defaults() -> None:
    assert GradientMoments().freeze() == {
        "grad_count": 0,
        "grad_mean": None,
        "grad_m2": None,
        "grad_nonfinite": 0,
        "grad_order": None,
    }


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (Plan(), {Moments}),
        (Plan(dead_units=True), {Moments, DeadUnits}),
        (Plan(saturation_derivative=0.05), {Moments, SaturatedValues}),
        (Plan(fingerprints=True), {Moments, Fingerprints}),
        (
            Plan(dead_units=True, saturation_derivative=0.1, fingerprints=True),
            {Moments, DeadUnits, SaturatedValues, Fingerprints},
        ),
        (
            Plan(activations=False, dead_units=True, saturation_derivative=0.05, fingerprints=True),
            set(),
        ),
    ],
)
def test_the_plan_switches_reducers_on(plan: Plan, expected: set) -> None:
    assert set(switched_on(plan)) == expected
    assert list(switched_on(plan)) == [r for r in OUTPUT_REDUCERS if r in expected]


def test_a_reducer_must_name_record_fields() -> None:
    with pytest.raises(TypeError, match="not SiteStats fields"):

        class Typo(OutputReducer):
            fields = ("saturated_counts",)
