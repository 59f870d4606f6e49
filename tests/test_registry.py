"""Every check owns its knowledge: run, request/needs, metrics, fixes, score, label and
docs. Walks the registry; each check's fixes, score and label run on a real finding of a
small model built to trigger it, through --what-if and baselines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT, case_batch, load_case_modules

import nnhealth
from nnhealth import baseline
from nnhealth.analyzers import REGISTRY, lookup
from nnhealth.analyzers._fixes import Fix, FixContext
from nnhealth.analyzers.base import REQUIRED_METHODS, REQUIRED_SECTIONS, Check, defined_in
from nnhealth.findings import Finding, Severity
from nnhealth.plan import Request

# each check's case module (tests/checks/): the bad case --what-if must resolve, and
# the layer-table columns its metrics put on the finding's row
MODULES = {m.CODE: m for m in load_case_modules()}


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


def test_every_check_names_a_what_if_case() -> None:
    for check in REGISTRY:
        module = MODULES.get(check.code)
        assert module is not None, f"{check.code}: no case module in tests/checks/"
        assert module.WHAT_IF in {c.id for c in module.BAD}, (check.code, module.WHAT_IF)


def _finding(report: nnhealth.Report, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code and f.severity >= Severity.WARNING]
    assert found, [(f.code, f.severity, f.message) for f in report.findings]
    return found[0]


@pytest.mark.parametrize("check", REGISTRY, ids=[c.code for c in REGISTRY])
def test_fixes_score_and_label_on_a_real_finding(check: type[Check]) -> None:
    module = MODULES[check.code]
    case = next(c for c in module.BAD if c.id == module.WHAT_IF)
    kwargs = dict(case.kwargs)
    report = nnhealth.scan(
        case.build(), case_batch(case), select=[check.code], what_if=True, **kwargs
    )
    f = _finding(report, check.code)
    instance = check()

    label = instance.label(f)
    assert isinstance(label, str) and label
    value = instance.score(f)
    assert isinstance(value, (int, float)) and value > 0
    assert baseline.score(f) == float(value)

    ctx = FixContext.of(report, kwargs.get("lr"), train=lambda *a, **k: (0.0, 0.0, ""))
    fixes = instance.fixes(f, ctx)
    assert fixes and all(isinstance(x, Fix) for x in fixes)
    tried = [w for w in report.what_if if w["finding"] == f.key]
    assert [w["fix"] for w in tried] == [x.label for x in fixes]
    assert all(w["before"] == label and w["before_score"] == baseline.score(f) for w in tried)
    assert any(w["applied"] and w["resolved"] for w in tried), tried

    rows = {r["name"]: r for r in report.layers}
    for column in getattr(module, "COLUMNS", ()):
        assert rows[f.layer][column] is not None, (column, rows[f.layer])


def test_no_fix_and_no_score_are_said_explicitly() -> None:
    """A finding a check cannot fix in memory gets [] (not an error) and its label."""
    info = Finding("NH101", "dead-relu", Severity.INFO, None, "too few", {}, "scan more")
    ctx = FixContext((), None, None, train=lambda *a, **k: (0.0, 0.0, ""))
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
