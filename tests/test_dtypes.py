"""Every dtype a checkpoint has: bfloat16, float16, float8 (and packed float4 skipped).

Ground truth is brute force in float64 on the SAME low-precision values (the model's
own bfloat16 activations, gradients and weights, upcast). Tolerances:

* against that brute force: activation and gradient moments are reduced in float32
  (cascaded sums, sums of squares by rows of 1024 values), 1e-5 relative (measured:
  at most 4e-7 in bfloat16, 6e-7 in float16); weight statistics are reduced in float64,
  1e-12. A bfloat16 reduction rounds its result to 8 significant bits (~2e-3).
* against the float32 model with the same initial weights: bfloat16 rounds every
  weight, activation and gradient to 8 significant bits (2**-9 = 2e-3 relative per
  value), and the per-layer moments average that out: 1e-2 relative (measured: 6e-4
  for variances, 2.4e-3 for means, which are taken relative to the layer's std);
  float16 keeps 11 bits: 1e-3 (measured 1e-4).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_schema, he_mlp, strict_json, upstream_symmetry
from torch import nn

import nnhealth
from nnhealth.analyzers import REGISTRY
from nnhealth.analyzers.saturation import Saturation
from nnhealth.analyzers.symmetry import Symmetry
from nnhealth.capture import weights as weight_stats
from nnhealth.capture.groups import near_duplicate_groups
from nnhealth.capture.instrument import run_pass
from nnhealth.capture.precision import collision_probability, moments64, norm64
from nnhealth.plan import Plan

HALF = [torch.bfloat16, torch.float16]
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]
EXACT = 1e-5  # float32 reductions of the same values, vs float64
EXACT64 = 1e-12  # float64 reductions of the same values
VS_FLOAT32 = {torch.bfloat16: 1e-2, torch.float16: 1e-3}
FINGERPRINTS = Plan(fingerprints=True)
ALL_CODES = {c.code for c in REGISTRY}


def rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-300)


def exact_moments(t: torch.Tensor) -> tuple[float, float, float]:
    """Mean, population variance and norm of the stored values, correctly rounded sums
    (math.fsum: torch's own float64 var is off by ~1e-11 on 4M values)."""
    a = t.detach().to(torch.float64).cpu().numpy().ravel()
    mean = math.fsum(a) / a.size
    return mean, math.fsum((a - mean) ** 2) / a.size, math.sqrt(math.fsum(a * a))


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def relu_tanh_mlp() -> nn.Sequential:
    """Linear-ReLU-Linear-tanh-Linear, 16 dead ReLU units and a partly saturated tanh."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)
    )
    with torch.no_grad():
        nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
        model[0].bias[:16] = -50.0
        nn.init.xavier_normal_(model[2].weight, gain=5 / 3)
        model[2].weight[:128] *= 4.0  # these tanh units sit mostly on their bounds
    return model


def batch(n: int = 256, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(2))
    return x, y


def brute_force(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict]:
    """Each module's output and its gradient, kept, in the model's dtype; every number
    computed from them in float64."""
    model = copy.deepcopy(model)
    outputs = {}
    h = x
    for i, module in enumerate(model):
        h = module(h)
        h.retain_grad()
        outputs[str(i)] = h
    ce(h, y).backward()
    unit_fraction = Saturation.defaults()["unit_fraction"]
    t = math.sqrt(1 - Saturation.defaults()["derivative_fraction"])
    rows = {}
    for name, out in outputs.items():
        a, g = out.detach().double(), out.grad.double()
        row = {
            "act_mean": a.mean().item(),
            "act_var": a.var(unbiased=False).item(),
            "grad_var": g.var(unbiased=False).item(),
        }
        module = model[int(name)]
        if isinstance(module, nn.Linear):
            _, row["init_var"], row["weight_norm"] = exact_moments(module.weight)
            row["weight_grad_norm"] = exact_moments(module.weight.grad)[2]
        if isinstance(module, nn.ReLU):
            row["dead_fraction"] = ((a > 0).sum(0) == 0).double().mean().item()
        if isinstance(module, nn.Tanh):
            row["mean_derivative"] = 1 - (a**2).mean().item()
            counts = (a.abs() >= t).sum(0)
            row["saturated_units"] = int((counts >= unit_fraction * a.shape[0]).sum())
        rows[name] = row
    return rows


def scan_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> dict[str, dict]:
    report = nnhealth.scan(model, (x, y), ce, select=["ALL"], **kwargs)
    assert not report.errors, report.errors
    return {row["name"]: row for row in report.layers}


# ---- in-memory models: statistics against brute force ------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_layer_statistics_match_float64_on_the_same_values(dtype: torch.dtype) -> None:
    model = relu_tanh_mlp().to(dtype)
    x, y = batch()
    x = x.to(dtype)
    rows = scan_rows(model, x, y)
    expected = brute_force(model, x, y)
    assert set(expected) <= set(rows)
    checked = 0
    for name, want in expected.items():
        for key, value in want.items():
            got = rows[name][key]
            tol = EXACT64 if key in ("weight_norm", "init_var") else EXACT
            if key in ("dead_fraction", "saturated_units"):
                assert got == value, (name, key)
            else:
                assert rel(got, value) <= tol, (name, key, got, value)
            checked += 1
    assert checked >= 25
    assert rows["1"]["dead_fraction"] == 16 / 512  # the -50 biases, nothing else
    assert 0 < rows["3"]["saturated_units"] < 512  # the saturation comparison was exercised


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_low_precision_statistics_track_the_float32_model(dtype: torch.dtype) -> None:
    x, y = batch()
    f32 = scan_rows(relu_tanh_mlp(), x, y)
    low = scan_rows(relu_tanh_mlp().to(dtype), x.to(dtype), y)
    tol = VS_FLOAT32[dtype]
    for name, row in f32.items():
        for key in ("act_var", "grad_var", "weight_norm", "weight_grad_norm", "init_var"):
            if row.get(key) is not None:
                assert rel(low[name][key], row[key]) <= tol, (name, key)
        # a mean near zero is compared on the scale of the layer's spread
        spread = math.sqrt(row["act_var"])
        assert abs(low[name]["act_mean"] - row["act_mean"]) <= tol * spread, name
        if row.get("init_ratio") is not None:
            assert rel(low[name]["init_ratio"], row["init_ratio"]) <= tol
        if "dead_fraction" in row:
            assert low[name]["dead_fraction"] == row["dead_fraction"]


def test_large_bfloat16_layer_is_not_summed_in_bfloat16() -> None:
    """2M bfloat16 outputs of one layer: the capture agrees with float64 to 1e-6, while
    the same reductions done in bfloat16 are off by far more than the tolerance."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 4096)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].bias.fill_(3.0)  # a mean against the spread: cancellation, too
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    cap = run_pass(model, x, lambda out: out.float().square().mean(), Plan(), examples=512)
    site = cap.layer_sites()[0]
    out = model(x).detach()
    assert site.dtype == "bfloat16"
    mean, var, _ = exact_moments(out)
    assert rel(site.mean, mean) <= EXACT
    assert rel(site.var, var) <= EXACT
    naive_var = float(out.square().mean()) - float(out.mean()) ** 2  # bfloat16 reductions
    assert rel(naive_var, var) > 1e-3


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_every_check_runs_on_half_precision_models(dtype: torch.dtype) -> None:
    model = he_mlp([16, 64, 64, 10]).to(dtype)
    x, y = batch(64, 16)
    report = nnhealth.scan(model, (x.to(dtype), y), ce, select=["ALL"], hessian=True, lr=0.1)
    assert not report.errors and not report.skipped
    assert set(report.run["checks"]) == ALL_CODES
    assert report.curvature is not None
    # Lanczos on this model's values in float64 (the same bfloat16/float16 weights)
    exact = nnhealth.scan(
        copy.deepcopy(model).double(),
        (x.to(dtype).double(), y),
        ce,
        select=["NH401"],
        hessian=True,
        hessian_tol=1e-8,
        hessian_budget=200,
    )
    lam, lam64 = report.curvature["top_eigenvalues"][0], exact.curvature["top_eigenvalues"][0]
    assert rel(lam, lam64) <= VS_FLOAT32[dtype], (lam, lam64)
    assert all(f.severity < nnhealth.Severity.ERROR for f in report.findings), report.findings


# ---- files through the CLI --------------------------------------------------------


def weight_rows(report: dict) -> dict[str, dict]:
    return {r["name"]: r for r in report["layers"] if r.get("init_var") is not None}


def assert_weight_rows_exact(report: dict, state: dict[str, torch.Tensor]) -> None:
    """init_var and weight_norm of every layer: float64 of the stored values."""
    rows = weight_rows(report)
    assert rows, report["layers"]
    for name, row in rows.items():
        w = state[f"{name}.weight"]
        _, var, norm = exact_moments(w)
        assert rel(row["init_var"], var) <= EXACT64, name
        assert rel(row["weight_norm"], norm) <= EXACT64, name
        assert row["fan_in"] == w.shape[1]


def scan_file(cli, path: Path, *extra: str):
    res = cli("scan", path, "--input-shape", "8x16", "--format", "json", *extra)
    assert "internal error" not in res.err, res.err
    assert res.code in (0, 1), res.err
    report = strict_json(res.out)
    if report["skipped"]:  # a bare state_dict: healthy is false while checks are skipped
        assert report["summary"]["healthy"] is False
        report_unskipped = {**report, "skipped": [], "summary": {**report["summary"]}}
        report_unskipped["summary"]["healthy"] = not report["findings"] and not report["errors"]
        assert_schema(report_unskipped)
    else:
        assert_schema(report)
    return res, report


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_module_file_scans(cli, tmp_path: Path, dtype: torch.dtype) -> None:
    model = he_mlp([16, 64, 64, 10]).to(dtype)
    torch.save(model, tmp_path / "model.pt")
    _, report = scan_file(cli, tmp_path / "model.pt")
    assert not report["errors"] and not report["skipped"]
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["1"]["act_var"] > 0 and rows["1"]["grad_var"] > 0
    assert rows["1"]["dead_fraction"] is not None
    assert_weight_rows_exact(report, model.state_dict())


def save_state(state: dict[str, torch.Tensor], path: Path, writer: str) -> None:
    if writer == "safetensors":
        st = pytest.importorskip("safetensors.torch")
        st.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
@pytest.mark.parametrize("dtype", HALF + FLOAT8, ids=str)
def test_state_dict_in_any_dtype_gets_the_weight_checks(
    cli, tmp_path: Path, dtype: torch.dtype, writer: str
) -> None:
    model = he_mlp([16, 256, 256, 10])
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    path = tmp_path / ("w.safetensors" if writer == "safetensors" else "w.pt")
    save_state(state, path, writer)
    _, report = scan_file(cli, path)
    assert {"NH001", "NH501", "NH601"} <= set(report["run"]["checks"])
    assert not report["errors"]
    assert {s["code"] for s in report["skipped"]} >= {"NH101", "NH201"}
    assert_weight_rows_exact(report, state)
    # He init: healthy in every dtype (no symmetry, no scale finding on the He layers)
    assert not [f for f in report["findings"] if f["code"] in ("NH001", "NH501")]
    rows = weight_rows(report)
    assert rows["0"]["effective_width"] == 256 and rows["2"]["effective_width"] == 256
    assert rows["0"]["init_ratio"] == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize(
    ("dtype", "bad"),
    [(torch.float8_e4m3fn, float("nan")), (torch.float8_e5m2, float("inf"))],
    ids=["e4m3fn-nan", "e5m2-inf"],
)
def test_float8_nonfinite_weights_are_found(
    cli, tmp_path: Path, dtype: torch.dtype, bad: float
) -> None:
    state = {k: v.to(dtype) for k, v in he_mlp([16, 64, 64, 10]).state_dict().items()}
    state["2.weight"][3, 5] = bad
    torch.save(state, tmp_path / "w.pt")
    res, report = scan_file(cli, tmp_path / "w.pt")
    assert res.code == 1
    found = [f for f in report["findings"] if f["code"] == "NH001"]
    assert [f["layer"] for f in found] == ["2"] and "1 NaN/Inf" in found[0]["message"]
    assert not [f for f in report["findings"] if f["code"] == "NH501"]


def test_packed_float4_tensors_are_skipped_not_fatal(cli, tmp_path: Path) -> None:
    fp4 = getattr(torch, "float4_e2m1fn_x2", None)
    if fp4 is None:
        pytest.skip("no float4 in this torch")
    state = {
        "0.weight": torch.zeros(64, 8, dtype=torch.uint8).view(fp4),
        "1.weight": he_mlp([64, 10]).state_dict()["0.weight"].to(torch.bfloat16),
    }
    torch.save(state, tmp_path / "w.pt")
    _, report = scan_file(cli, tmp_path / "w.pt")
    assert [r["name"] for r in report["layers"] if r.get("init_var") is not None] == ["1"]


# ---- NH501 symmetry at low precision -----------------------------------------------


def one_layer_state(fan_in: int, units: int, dtype: torch.dtype, copies: int = 0) -> dict:
    """A He-init layer with zero bias feeding a head; ``copies`` copies of unit 0."""
    model = he_mlp([fan_in, units, 10], seed=3)
    with torch.no_grad():
        model[0].weight[1 : copies + 1] = model[0].weight[0]
    return {k: v.detach().to(dtype) for k, v in model.state_dict().items()}


def symmetry_findings(state: dict) -> tuple[list, tuple]:
    stats = weight_stats.from_state_dict(state, Symmetry.defaults()["rtol"])
    capture = nnhealth.capture.stats.Capture(
        sites=(),
        params=(),
        has_activations=False,
        has_gradients=False,
        loss=None,
        mode=None,
        examples=None,
        weights=stats,
    )
    return Symmetry().run(capture, Symmetry.defaults()), stats


@pytest.mark.parametrize("dtype", HALF + FLOAT8, ids=str)
def test_random_low_precision_layer_has_no_duplicates(dtype: torch.dtype) -> None:
    state = one_layer_state(256, 256, dtype)
    w = state["0.weight"].float()
    # the dtype does merge values: far fewer distinct weights than in float32
    distinct = torch.unique(w).numel()
    assert (
        distinct < 0.5 * w.numel()
        and torch.unique(one_layer_state(256, 256, torch.float32)["0.weight"]).numel()
        > 0.99 * w.numel()
    )
    found, stats = symmetry_findings(state)
    assert found == [] and stats[0].groups == ()
    # ... while copied units are still found, exactly
    found, _ = symmetry_findings(one_layer_state(256, 256, dtype, copies=3))
    assert [(f.layer, f.evidence["first_group"], f.evidence["exact"]) for f in found] == [
        ("0", "0,1,2,3", True)
    ]


@pytest.mark.parametrize(
    ("dtype", "units"),
    [(torch.float8_e4m3fn, 64), (torch.float8_e5m2, 64), (torch.bfloat16, 256)],
    ids=str,
)
def test_units_of_one_input_collide_by_chance_not_by_symmetry(
    dtype: torch.dtype, units: int
) -> None:
    """Linear(1, units) with zero bias: each unit is one weight. float8 has a few dozen
    values in the He range and bfloat16 a few hundred, so some units are equal by
    chance: that is not symmetry. 16 copies of one unit are far beyond chance."""
    found, stats = symmetry_findings(one_layer_state(1, units, dtype))
    w = stats[0]
    pairs = sum(len(g) * (len(g) - 1) // 2 for g in w.groups)
    assert pairs >= 1  # equal rows exist...
    assert w.chance_pairs >= pairs / 4  # ...about as many as chance gives
    assert found == []
    found, stats = symmetry_findings(one_layer_state(1, units, dtype, copies=16))
    assert len(found) == 1 and found[0].layer == "0"
    assert any(set(range(17)) <= set(g) for g in stats[0].groups)
    # float32 keeps them apart: no group at all, and a copy is reported
    assert symmetry_findings(one_layer_state(1, units, torch.float32))[1][0].groups == ()


def test_chance_model_matches_observed_collisions() -> None:
    """The collision probability of a random value stored in float8 e4m3, against the
    observed rate over many draws (the model takes the worse of Gaussian and uniform
    init, so it may be above the Gaussian rate, never far below)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, generator=gen).mul(0.1).to(torch.float8_e4m3fn).float()
    b = torch.randn(200_000, generator=gen).mul(0.1).to(torch.float8_e4m3fn).float()
    observed = (a == b).double().mean().item()
    q = collision_probability(torch.float8_e4m3fn, 0.1)
    assert observed * 0.9 <= q <= observed * 2.0, (observed, q)
    assert collision_probability(torch.float8_e4m3fn, 0.0) == 1.0  # not random at all


def raw_output_groups(site) -> list[np.ndarray]:
    """Groups of live units with equal fingerprints, as the symmetry check forms them
    before it weighs them against chance (unit indices)."""
    fp = site.unit_fingerprint
    live = np.flatnonzero(fp[:, 3] > fp[:, 2])
    groups = near_duplicate_groups(fp[live, :2], 1e-6)
    return [live[g] for g in groups if np.all(fp[live[g], 2:] == fp[live[g[0]], 2:])]


def test_bfloat16_outputs_equal_by_chance_are_not_symmetry() -> None:
    """4096 ReLU units on a batch of 8 in bfloat16: units that fire on the same one or
    two examples often agree to all 8 bits there. Those groups exist in the fingerprints
    but are not reported; float32 has none. The values that tell such units apart are
    counted exactly (brute force on the module's outputs)."""
    x, y = batch(8, 16)
    raw = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = he_mlp([16, 4096, 4096, 10]).to(dtype)
        cap = run_pass(model, x.to(dtype), lambda out: ce(out, y), FINGERPRINTS, examples=8)
        with torch.no_grad():  # the same forward, every ReLU output kept
            h1 = model[1](model[0](x.to(dtype)))
            outputs = {"1": h1, "3": model[3](model[2](h1))}
        raw[dtype] = 0
        for site in cap.activation_sites():
            out = outputs[site.name].double()
            lo, hi = out.amin(0), out.amax(0)
            inside = ((out > lo) & (out < hi)).sum(0).numpy()
            for units in raw_output_groups(site):
                raw[dtype] += 1
                np.testing.assert_array_equal(site.unit_interior[units], inside[units])
        report = nnhealth.scan(model, (x.to(dtype), y), ce, select=["NH501"])
        assert report.findings == (), [f.message for f in report.findings]
    assert raw[torch.bfloat16] >= 3 and raw[torch.float32] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batchnorm_over_two_examples_is_not_symmetry(dtype: torch.dtype) -> None:
    """BatchNorm over a batch of 2 outputs -1 and +1 in every channel: after the ReLU all
    256 units look alike (exactly so in bfloat16). The batch, not the model, did that."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10)
    ).to(dtype)
    x, y = batch(2, 16)
    cap = run_pass(model, x.to(dtype), lambda out: ce(out, y), FINGERPRINTS, examples=2)
    if dtype == torch.bfloat16:  # they do look alike (float32 keeps BatchNorm's eps apart)
        assert len(np.concatenate(raw_output_groups(cap.activation_sites()[0]))) >= 128
    report = nnhealth.scan(model, (x.to(dtype), y), ce, select=["NH501"])
    assert report.findings == ()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_symmetry_created_upstream_still_found_at_low_precision(dtype: torch.dtype) -> None:
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    report = nnhealth.scan(upstream_symmetry().to(dtype), (x.to(dtype), y), select=["NH501"])
    assert [(f.layer, f.evidence["first_group"]) for f in report.findings] == [("3", "0,1")]


def test_nonfinite_rows_are_nobodys_copy() -> None:
    rows = np.random.default_rng(0).standard_normal((6, 8))
    rows[2, 0] = np.inf
    rows[4, 1] = np.nan
    assert near_duplicate_groups(rows, 1e-6) == []
    rows[5] = rows[0]
    assert near_duplicate_groups(rows, 1e-6) == [[0, 5]]


# ---- NH601 and the helpers: float64 whatever the dtype -----------------------------


@pytest.mark.parametrize("dtype", HALF + FLOAT8, ids=str)
def test_weight_moments_and_norms_are_float64(dtype: torch.dtype) -> None:
    w = (torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.01).to(
        dtype
    )
    ref_mean, ref_var, ref_norm = exact_moments(w)
    mean, var = moments64(w)
    assert rel(mean, ref_mean) <= EXACT64
    assert rel(var, ref_var) <= EXACT64
    assert rel(norm64(w), ref_norm) <= EXACT64
    (stats,) = weight_stats.from_state_dict({"fc.weight": w}, None)
    assert stats.dtype == str(dtype).removeprefix("torch.")
    assert rel(stats.var, ref_var) <= EXACT64


# ---- a real architecture ------------------------------------------------------------


def test_torchvision_resnet18_in_bfloat16_has_no_extra_errors() -> None:
    models = pytest.importorskip("torchvision.models")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (2,), generator=torch.Generator().manual_seed(1))
    reports = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = models.resnet18(num_classes=10).to(dtype)
        reports[dtype] = nnhealth.scan(model, (x.to(dtype), y))
        assert not reports[dtype].errors, reports[dtype].errors

    def errors(report) -> set:
        return {(f.code, f.layer) for f in report.findings if f.severity >= nnhealth.Severity.ERROR}

    assert errors(reports[torch.bfloat16]) <= errors(reports[torch.float32])
    codes = {dtype: {f.code for f in r.findings} for dtype, r in reports.items()}
    assert "NH501" not in codes[torch.bfloat16]  # BatchNorm over 2 values is not symmetry
    rows = {dtype: {r["name"]: r for r in rep.layers} for dtype, rep in reports.items()}
    for name, row in rows[torch.float32].items():
        if row.get("init_var") is not None:
            assert rel(rows[torch.bfloat16][name]["init_var"], row["init_var"]) <= 1e-2, name


def test_report_json_is_strict_for_low_precision(tmp_path: Path) -> None:
    model = he_mlp([16, 64, 10]).to(torch.bfloat16)
    x, y = batch(8, 16)
    report = nnhealth.scan(model, (x.to(torch.bfloat16), y), ce, select=["ALL"])
    json.loads(report.to_json(), parse_constant=lambda name: pytest.fail(name))


def test_float16_overflow_is_reported_with_its_range() -> None:
    """Activations near 1e5: finite in float32 and bfloat16 (float32's range), Inf in
    float16 (largest finite 65504). NH001 names the layer and says why."""
    model = he_mlp([16, 64, 64, 10])
    with torch.no_grad():
        model[2].weight.mul_(3000.0)
    x, y = batch(32, 16)
    x = x * 10
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        report = nnhealth.scan(copy.deepcopy(model).to(dtype), (x.to(dtype), y), select=["NH001"])
        found = [f for f in report.findings if f.kind == "activation"]
        if dtype == torch.float16:
            assert [f.layer for f in found] == ["2"]
            assert "float16, whose largest finite value is 65504" in found[0].message
        else:
            assert report.findings == ()


def test_float8_module_file_gets_the_weight_checks_and_says_why_not_more(
    cli, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    torch.save(model.to(torch.float8_e4m3fn), tmp_path / "f8.pt")
    res = cli("scan", tmp_path / "f8.pt", "--input-shape", "8x16", "--format", "json")
    assert res.code in (0, 1), res.err
    report = json.loads(res.out)
    assert report["run"]["checks"] and {s["code"] for s in report["skipped"]} >= {"NH101", "NH202"}
    assert all("float8_e4m3fn forward" in s["reason"] for s in report["skipped"])
    assert any("float8_e4m3fn parameters" in n for n in report["notes"])
    # the weights were read: NH601's ratio is the float64 variance of the stored values
    first = next(r for r in report["layers"] if r["name"] == "0")
    w = model[0].weight.detach().to(torch.float64)
    assert first["weight_norm"] == pytest.approx(float(w.norm()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_curvature_is_certified_on_a_float32_copy(dtype: torch.dtype) -> None:
    """Products in bfloat16 carry ~4e-3 rounding, more than the tolerance; on a float32
    copy of the same weights the certified bound holds against the dense float64
    Hessian of those weights, and the model itself stays in its dtype."""
    from torch.func import functional_call, grad, jacrev

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    report = nnhealth.scan(
        model, (x, y), select=["NH401"], hessian=True, hessian_tol=1e-6, hessian_budget=300
    )
    assert report.curvature["converged"]
    assert any("float32 copy" in n for n in report.notes)
    assert all(p.dtype == dtype for p in model.parameters())
    ref = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for p in ref.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = flat[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return torch.nn.functional.cross_entropy(functional_call(ref, params, (x.double(),)), y)

    truth = float(np.linalg.eigvalsh(jacrev(grad(loss))(flat0).detach().numpy())[-1])
    top, bound = report.curvature["top_eigenvalues"][0], report.curvature["bounds"][0]
    # float32 products: within the certified bound plus float32 rounding of the operator
    assert abs(top - truth) <= bound + 1e-5 * truth
