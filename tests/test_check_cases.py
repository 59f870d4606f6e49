"""Every check on its named good and bad cases (tests/checks/<code>_<name>.py), run by one
generic test; each case's findings (the report's JSON form: message, evidence, fix and
snippet included) are compared with tests/checks/snapshots/<code>-<case>.json.

Numbers are compared to a relative tolerance of REL, text exactly: messages print 3 or
4 significant digits, so a case whose printed number sits within 2 REL of a rounding
edge fails and is moved (seed, scale), not compared more loosely.

Adding a check's cases:
1. write tests/checks/nh103_leaky_slope.py (code in lower case, name with underscores)
   holding CODE = "NH103", BAD = [Case(...)] (each with ``expect``, the worst severity,
   and the ``layer`` it must name) and GOOD = [Case(...), *healthy_cases()]; helpers come
   from conftest.py only;
2. ``python -m pytest tests/test_check_cases.py -k NH103 --update-golden`` writes the
   snapshots; read them;
3. run ``python -m pytest tests/test_check_cases.py`` twice: it must pass both times.
``--update-golden`` also removes the snapshots of deleted cases; review the diff.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import CASES_DIR, ROOT, Case, load_case_modules, scan_case

from nnhealth.analyzers import REGISTRY
from nnhealth.findings import Severity

SNAPSHOTS = CASES_DIR / "snapshots"
REL = 1e-5  # relative tolerance on every number of a snapshot
# how numbers are printed in findings (findings' num/pct, the curvature's 4 digits)
FORMATS = (
    lambda v: f"{v:.2g}",
    lambda v: f"{v:.3g}",
    lambda v: f"{v:.4g}",
    lambda v: f"{100 * v:.0f}%",
)
NUMBER_TEXT = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?%?")
UPDATE = "python -m pytest tests/test_check_cases.py --update-golden"


def module_file(code: str, name: str) -> Path:
    return CASES_DIR / f"{code.lower()}_{name.replace('-', '_')}.py"


MODULES = load_case_modules()
CASES = [(m.CODE, case) for m in MODULES for case in (*m.BAD, *m.GOOD)]


def snapshot_file(code: str, case: Case) -> Path:
    return SNAPSHOTS / f"{code.lower()}-{case.id}.json"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def differences(actual: Any, expected: Any, path: str = "$") -> list[str]:
    """Where ``actual`` departs from ``expected``: numbers beyond REL, anything else
    not equal."""
    if isinstance(actual, dict) and isinstance(expected, dict):
        out = [f"{path}.{k}: missing" for k in expected if k not in actual]
        out += [f"{path}.{k}: not in the snapshot" for k in actual if k not in expected]
        pairs = [(actual[k], expected[k], f"{path}.{k}") for k in expected if k in actual]
    elif isinstance(actual, list) and isinstance(expected, list):
        if len(actual) != len(expected):
            return [f"{path}: {len(actual)} items, the snapshot has {len(expected)}"]
        out = []
        pairs = [(a, e, f"{path}[{i}]") for i, (a, e) in enumerate(zip(actual, expected))]
    else:
        if is_number(actual) and is_number(expected):
            same = math.isclose(actual, expected, rel_tol=REL, abs_tol=0.0)
        else:
            same = type(actual) is type(expected) and actual == expected
        return [] if same else [f"{path}: {actual!r} != {expected!r} (snapshot)"]
    return out + [d for a, e, where in pairs for d in differences(a, e, where)]


def near_rounding_edges(finding: dict) -> list[str]:
    """Evidence numbers printed in the text that a change of 2 REL would print otherwise:
    the snapshot would accept the number but not the text."""
    text = " ".join(finding[k] or "" for k in ("message", "fix", "fix_snippet"))
    printed = set(NUMBER_TEXT.findall(text))
    out = []
    for key, v in finding["evidence"].items():
        if not isinstance(v, float) or v == 0.0:
            continue
        shown = [fmt for fmt in FORMATS if fmt(v) in printed]
        moved = [{fmt(v * (1 - 2 * REL)), fmt(v), fmt(v * (1 + 2 * REL))} for fmt in shown]
        if any(len(texts) > 1 for texts in moved):
            out.append(f"{finding['layer']}: {key} = {v!r} printed as {shown[0](v)}")
    return out


def check_severities(code: str, case: Case, findings: list) -> None:
    worst = max((f.severity for f in findings), default=None)
    if case.expect is None:
        assert worst is None or worst < Severity.WARNING, [f.message for f in findings]
        return
    assert worst == case.expect, f"{code} {case.id}: worst {worst}, expected {case.expect}"
    if case.layer != "any":
        assert case.layer in [f.layer for f in findings if f.severity == case.expect]
    assert all(f.fix and f.message for f in findings)


@pytest.mark.parametrize(("code", "case"), CASES, ids=[f"{c}-{case.id}" for c, case in CASES])
def test_case(code: str, case: Case, update_golden: bool) -> None:
    report, model = scan_case(code, case)
    findings = list(report.findings)
    check_severities(code, case, findings)
    if case.verify is not None:
        case.verify(findings, model)
    actual = {"check": code, "case": case.id, "findings": report.to_dict()["findings"]}
    edges = [e for f in actual["findings"] for e in near_rounding_edges(f)]
    assert not edges, (
        f"{code} {case.id}: move the case off the rounding edge (seed, scale): {edges}"
    )
    path = snapshot_file(code, case)
    if update_golden:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(actual, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    where = path.relative_to(ROOT)
    assert path.is_file(), f"no snapshot {where}: create it with `{UPDATE}` and review it"
    diff = differences(actual, json.loads(path.read_text()))
    assert not diff, "\n".join([*diff, f"if the change is intended: `{UPDATE}`"])


def test_every_check_has_a_case_module_with_good_and_bad_cases() -> None:
    by_code = {m.CODE: m for m in MODULES}
    for check in REGISTRY:
        path = module_file(check.code, check.name)
        assert check.code in by_code and Path(by_code[check.code].__file__) == path, (
            f"{check.code} {check.name} has no cases: write {path.relative_to(ROOT)} with "
            f"CODE, BAD and GOOD (see nh101_dead_relu.py), then `{UPDATE}`"
        )
        module = by_code[check.code]
        assert module.BAD, f"{check.code}: BAD is empty: add a model the check must flag"
        assert module.GOOD, f"{check.code}: GOOD is empty: add a healthy model"


def test_case_modules_are_well_formed() -> None:
    codes = {c.code for c in REGISTRY}
    for module in MODULES:
        assert module.CODE in codes, f"{module.__file__}: {module.CODE} is not in the registry"
        ids = [c.id for c in (*module.BAD, *module.GOOD)]
        assert len(ids) == len(set(ids)), f"{module.CODE}: case ids repeat"
        assert all(c.expect is not None for c in module.BAD), (
            f"{module.CODE}: a BAD case needs expect"
        )
        assert all(c.expect is None for c in module.GOOD), f"{module.CODE}: a GOOD case has expect"


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in conftest.py; case modules are loaded only by this file."""
    tests = Path(__file__).parent
    private = {p.stem for p in tests.glob("test_*.py")} | {p.stem for p in CASES_DIR.glob("*.py")}
    found = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0] in private | {"tests", "checks"}
            ]
    assert not found, f"move what they share into tests/conftest.py: {found}"


def test_every_snapshot_belongs_to_a_case(update_golden: bool) -> None:
    wanted = {snapshot_file(code, case) for code, case in CASES}
    orphans = sorted(set(SNAPSHOTS.glob("*.json")) - wanted)
    if update_golden:
        for path in orphans:
            path.unlink()
        return
    assert not orphans, f"snapshots of no case (delete them, or `{UPDATE}`): {orphans}"


def test_differences_within_and_beyond_the_tolerance() -> None:
    snap = {"message": "60% dead", "evidence": {"units": 128, "fraction": 0.6, "verdict": None}}
    close = {
        "message": "60% dead",
        "evidence": {"units": 128, "fraction": 0.6 * (1 + REL / 2), "verdict": None},
    }
    assert differences(close, snap) == []
    fraction = 0.6 * (1 + 2 * REL)
    far = {"message": "61% dead", "evidence": {"units": 129, "fraction": fraction, "verdict": 0}}
    assert sorted(differences(far, snap)) == [
        f"$.evidence.fraction: {fraction!r} != 0.6 (snapshot)",
        "$.evidence.units: 129 != 128 (snapshot)",
        "$.evidence.verdict: 0 != None (snapshot)",
        "$.message: '61% dead' != '60% dead' (snapshot)",
    ]
    assert differences([1, 2], [1]) == ["$: 2 items, the snapshot has 1"]
    assert differences({"a": True}, {"a": 1}) == ["$.a: True != 1 (snapshot)"]
