"""Every check owns its knowledge: run, request/needs, metrics, fixes, score, label and
docs. Walks the registry; each check's fixes, score and label run on a real finding of a
small model built to trigger it, through --what-if and baselines."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT, he, he_mlp, stack
from torch import nn

import nnhealth
from nnhealth import baseline
from nnhealth.analyzers import REGISTRY, lookup
from nnhealth.analyzers._fixes import Fix, FixContext
from nnhealth.analyzers.base import REQUIRED_METHODS, REQUIRED_SECTIONS, Check, defined_in
from nnhealth.findings import Finding, Severity
from nnhealth.plan import Request

Case = Callable[[], tuple[nn.Module, object, dict]]


def _batch(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, dim, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def nonfinite() -> tuple[nn.Module, object, dict]:
    model = he_mlp([16, 32, 32, 4])
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return model, _batch(64, 16), {}


def dead_relu() -> tuple[nn.Module, object, dict]:
    model = he_mlp([32, 64, 64, 4])
    with torch.no_grad():
        model[2].bias[:40] = -50.0
    return model, _batch(64, 32), {}


def saturation() -> tuple[nn.Module, object, dict]:
    return stack(64, 3, nn.Tanh, lambda n: 1.0), _batch(64, 64), {}


def vanishing() -> tuple[nn.Module, object, dict]:
    return stack(64, 5, nn.Tanh, lambda n: 0.01), _batch(64, 64), {}


def norm_spread() -> tuple[nn.Module, object, dict]:
    model = stack(64, 3, nn.ReLU, he, norm=nn.BatchNorm1d)
    with torch.no_grad():
        model[3].weight.mul_(100.0)
    return model, _batch(64, 64), {}


def curvature() -> tuple[nn.Module, object, dict]:
    torch.manual_seed(0)
    model = nn.Linear(8, 2).double()
    x = torch.randn(64, 8, dtype=torch.float64) * torch.linspace(0.2, 3.0, 8, dtype=torch.float64)
    return model, (x, torch.randn(64, 2, dtype=torch.float64)), {"hessian": True, "lr": 100.0}


def symmetry() -> tuple[nn.Module, object, dict]:
    model = he_mlp([16, 32, 32, 4])
    with torch.no_grad():
        model[2].weight.fill_(0.1)
        model[2].bias.zero_()
    return model, _batch(64, 16), {}


def init_scale() -> tuple[nn.Module, object, dict]:
    # Var(w) = 1/fan_in, half of He's, through 8 ReLU layers: x0.5^8
    return stack(64, 8, nn.ReLU, lambda n: math.sqrt(1 / n)), _batch(64, 64), {}


CASES: dict[str, Case] = {
    "NH001": nonfinite,
    "NH101": dead_relu,
    "NH102": saturation,
    "NH201": vanishing,
    "NH202": vanishing,
    "NH301": norm_spread,
    "NH401": curvature,
    "NH501": symmetry,
    "NH601": init_scale,
}

# the layer-table columns a check's metrics put on its finding's row
COLUMNS = {
    "NH101": {"dead_units", "dead_fraction"},
    "NH102": {"saturated_units", "saturated_fraction", "mean_derivative"},
    "NH501": {"symmetry_groups", "effective_width"},
}


@pytest.mark.parametrize("check", REGISTRY, ids=[c.code for c in REGISTRY])
def test_check_defines_everything_itself(check: type[Check]) -> None:
    for method in REQUIRED_METHODS:
        assert defined_in(check, method) is not Check, f"{check.code} lacks {method}"
    assert isinstance(check.needs, frozenset) and check.summary
    assert isinstance(check.request(check.defaults()), Request)
    doc = check.doc()
    assert all(f"{section}:" in doc for section in REQUIRED_SECTIONS)


def test_codes_and_names_are_unique() -> None:
    assert len({c.code for c in REGISTRY}) == len({c.name for c in REGISTRY}) == len(REGISTRY)


@pytest.mark.parametrize("missing", REQUIRED_METHODS)
def test_a_check_lacking_a_method_is_refused(missing: str) -> None:
    body = {
        "__doc__": "Doc.\n\nWhat it detects: x\nWhy it matters: x\nExample: x\nHow to fix: x",
        "code": "NH998",
        "name": "incomplete",
        "summary": "",
        "needs": frozenset(),
    }
    body.update({m: (lambda self, *a: None) for m in REQUIRED_METHODS if m != missing})
    with pytest.raises(TypeError, match=f"does not define \\['{missing}'\\]"):
        type("Incomplete", (Check,), body)


def test_a_check_lacking_needs_is_refused() -> None:
    with pytest.raises(TypeError, match="lacks \\['needs'\\]"):

        class NoNeeds(Check):
            code, name, summary = "NH997", "no-needs", ""


def test_whatif_and_baseline_name_no_check() -> None:
    for module in ("whatif.py", "baseline.py"):
        source = (ROOT / "nnhealth" / module).read_text()
        assert not re.findall(r"NH\d{3}", source), module


def test_every_check_has_a_case() -> None:
    assert set(CASES) == {c.code for c in REGISTRY}


def _finding(report: nnhealth.Report, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code and f.severity >= Severity.WARNING]
    assert found, [(f.code, f.severity, f.message) for f in report.findings]
    return found[0]


@pytest.mark.parametrize("check", REGISTRY, ids=[c.code for c in REGISTRY])
def test_fixes_score_and_label_on_a_real_finding(check: type[Check]) -> None:
    model, batch, kwargs = CASES[check.code]()
    report = nnhealth.scan(model, batch, select=[check.code], what_if=True, **kwargs)
    f = _finding(report, check.code)
    instance = check()

    label = instance.label(f)
    assert isinstance(label, str) and label
    value = instance.score(f)
    assert isinstance(value, (int, float)) and value > 0
    assert baseline.score(f) == float(value)

    ctx = FixContext.of(report, kwargs.get("lr"), sgd=lambda *a, **k: (0.0, 0.0, ""))
    fixes = instance.fixes(f, ctx)
    assert fixes and all(isinstance(x, Fix) for x in fixes)
    tried = [w for w in report.what_if if w["finding"] == f.key]
    assert [w["fix"] for w in tried] == [x.label for x in fixes]
    assert all(w["before"] == label and w["before_score"] == baseline.score(f) for w in tried)
    assert any(w["applied"] and w["resolved"] for w in tried), tried

    rows = {r["name"]: r for r in report.layers}
    for column in COLUMNS.get(check.code, ()):
        assert rows[f.layer][column] is not None, (column, rows[f.layer])


def test_no_fix_and_no_score_are_said_explicitly() -> None:
    """A finding a check cannot fix in memory gets [] (not an error) and its label."""
    info = Finding("NH101", "dead-relu", Severity.INFO, None, "too few", {}, "scan more")
    ctx = FixContext((), None, None, sgd=lambda *a, **k: (0.0, 0.0, ""))
    assert lookup("NH101")().fixes(info, ctx) == []
    assert lookup("NH401")().fixes(info, ctx) == []  # no curvature, no lr
    assert lookup("NH101")().score(info) is None


def test_analyzers_import_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, nnhealth.analyzers, nnhealth.analyzers._fixes, nnhealth.baseline; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
