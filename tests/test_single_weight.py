"""NH601 on layers with one weight per output unit (Linear(1, 1), Linear(1, n)): judged
by E[w^2] (|w|^2 for one weight), outside what the init rule itself draws 99.8% of the
time, never by a variance of single draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import nnhealth
from nnhealth.analyzers import init_scale
from nnhealth.capture.stats import WeightStats
from nnhealth.findings import Severity


def weight(values: list[float], fan_in: int = 1, followed_by: str = "none") -> WeightStats:
    """A Linear(fan_in, len(values) // fan_in) weight with these values (rows first)."""
    w = np.asarray(values, dtype=np.float64)
    units = len(values) // fan_in
    return WeightStats(
        module="lin",
        param="lin.weight",
        kind="Linear",
        shape=(units, fan_in),
        fan_in=fan_in,
        fan_out=units,
        mean=float(w.mean()),
        var=float(w.var()),
        trainable=True,
        order=0,
        followed_by=followed_by,
        is_output=False,
    )


def test_one_weight_is_judged_by_its_square() -> None:
    # LeCun for a linear output at fan_in 1: Var = 1, so the ratio is w^2
    assert init_scale.scale(weight([1e-4])) == pytest.approx(1e-8, rel=1e-12)
    assert init_scale.ratio(weight([1e-4])) == pytest.approx(1e-8, rel=1e-12)
    assert init_scale.ratio(weight([0.0])) == 0.0
    assert init_scale.ratio(weight([0.7])) == 1.0  # a plain draw of the rule
    assert init_scale.ratio(weight([-5.0])) == pytest.approx(25.0)
    # He at fan_in 1 (ReLU after it): Var = 2
    assert init_scale.ratio(weight([1e-3], followed_by="relu")) == pytest.approx(5e-7)


def test_more_inputs_per_unit_keep_the_variance() -> None:
    w = weight([0.1, -0.1, 0.3, -0.3], fan_in=2)
    assert not init_scale.one_per_unit(w)
    assert init_scale.scale(w) == pytest.approx(np.var([0.1, -0.1, 0.3, -0.3]))


@pytest.mark.parametrize("n", [1, 8])
def test_draw_band_matches_sampled_draws(n: int) -> None:
    """The band against the 0.1% / 99.9% quantiles of the mean of n squared normal
    draws, from 4e6 samples: within 5% (sampling error of those quantiles ~1-2%)."""
    gen = np.random.default_rng(0)
    msq = (gen.standard_normal((4_000_000, n)) ** 2).mean(axis=1)
    lo, hi = init_scale._draw_band(n)
    assert lo == pytest.approx(np.quantile(msq, 1e-3), rel=0.05)
    assert hi == pytest.approx(np.quantile(msq, 1 - 1e-3), rel=0.05)


def test_the_default_draw_rarely_leaves_the_band() -> None:
    """PyTorch's default Linear(1, 1) draws w ~ U(-1, 1): the share judged off-target
    (|w| under sqrt(band_lo) of LeCun's std 1, or over sqrt(band_hi) > 1: never) is
    sqrt(band_lo), 0.13%."""
    lo, hi = init_scale._draw_band(1)
    assert np.sqrt(lo) < 2e-3 and np.sqrt(hi) > 1


def scan(model: nn.Module, inputs: int = 1) -> list:
    gen = torch.Generator().manual_seed(7)
    batch = (torch.randn(64, inputs, generator=gen), torch.randn(64, 1, generator=gen))
    report = nnhealth.scan(model, batch, select=["NH601"])
    assert not report.errors
    return [f for f in report.findings if f.severity >= Severity.WARNING]


def linear11(w: float | None, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(1, 1)
    if w is not None:
        with torch.no_grad():
            layer.weight.fill_(w)
    return layer


@pytest.mark.parametrize("seed", range(10))
def test_default_linear11_is_silent(seed: int) -> None:
    assert scan(linear11(None, seed)) == []  # seed 0 draws w = -0.0075


def test_linear11_at_0_7_is_silent() -> None:
    assert scan(linear11(0.7)) == []


@pytest.mark.parametrize(("w", "shown"), [(1e-4, "|w| = 0.0001"), (20.0, "|w| = 20")])
def test_linear11_far_off_fires_on_abs_w(w: float, shown: str) -> None:
    (finding,) = scan(linear11(w))
    assert finding.severity == Severity.WARNING and finding.layer == ""
    assert shown in finding.message and "Var(w)" not in finding.message
    assert finding.evidence["rms_w"] == pytest.approx(abs(w), rel=1e-6)


def one_to_eight(scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.mul_(scale)
    return model


def test_one_to_eight_default_is_silent() -> None:
    assert scan(one_to_eight()) == []


def test_one_to_eight_shrunk_fires_on_rms_w() -> None:
    """Eight single-weight units 1e-3 of PyTorch's default: E[w^2] x1.7e-7 of He."""
    findings = scan(one_to_eight(1e-3))
    assert findings and findings[0].layer == "0"
    assert "rms(w) = " in findings[0].message and "single-weight units" in findings[0].message
