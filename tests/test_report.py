"""The text report against a golden file, and the Report's own logic, on hand-built data."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import hand_built

from nnhealth.findings import AnalyzerError, Finding, Report, Severity
from nnhealth.formatters import RenderOptions, get_formatter
from nnhealth.formatters.text import log_bar

GOLDEN = Path(__file__).parent / "golden"


def render(report: Report, **kw) -> str:
    return get_formatter("text", RenderOptions(width=110, **kw)).render(report)


def test_golden_text_report(update_golden: bool) -> None:
    text = render(hand_built())
    path = GOLDEN / "report.txt"
    if update_golden:
        path.write_text(text)
    assert text == path.read_text(), "run pytest --update-golden after an intended change"


def test_text_report_parts() -> None:
    text = render(hand_built())
    assert text.index("Errors (1)") < text.index("Warnings (1)") < text.index("Info (1)")
    assert "✗ 1 error, 1 warning, 1 info from 4 checks (1 skipped)" in text
    assert "skipped NH202 gradient-variance: no gradients were captured" in text
    assert "relu()" in text  # functional calls are marked
    quiet = render(hand_built(), quiet=True)
    assert "Layers" not in quiet and "get_submodule" not in quiet and "NH101" in quiet


def test_healthy_verdict() -> None:
    report = Report(run={"model": "m", "checks": ["NH001"]}, layers=(), findings=())
    assert "✓ healthy: no findings from 1 checks" in render(report)
    assert report.ok() and report.healthy and report.worst() is None


def test_ok_thresholds_and_analyzer_errors() -> None:
    report = hand_built()
    assert not report.ok()
    assert not report.ok("warning")
    warn_only = Report(run={}, layers=(), findings=report.findings[1:])
    assert warn_only.ok() and not warn_only.ok(Severity.WARNING) and warn_only.ok("error")
    broken = Report(run={}, layers=(), findings=(), errors=(AnalyzerError("x", "boom"),))
    assert not broken.ok() and not broken.healthy
    with pytest.raises(ValueError, match="unknown severity"):
        report.ok("fatal")


def test_json_writes_null_for_nonfinite() -> None:
    report = Report(
        run={"loss_value": float("nan")},
        layers=({"act_var": float("inf")},),
        findings=(
            Finding("NH001", "nonfinite", Severity.ERROR, None, "m", {"x": float("-inf")}, "f"),
        ),
    )
    data = report.to_dict()
    assert data["run"]["loss_value"] is None and data["layers"][0]["act_var"] is None
    assert data["findings"][0]["evidence"]["x"] is None
    assert "NaN" not in report.to_json() and "Infinity" not in report.to_json()


@pytest.mark.parametrize(
    "value,bar",
    [(1e-8, "█·······"), (1e-4, "████····"), (1.0, "████████"), (0.0, "········"), (None, "")],
)
def test_log_bar(value, bar: str) -> None:
    assert log_bar(value, 1e-8, 1.0) == bar


def test_curvature_line_in_header() -> None:
    import dataclasses

    curvature = {
        "top_eigenvalues": [12.5],
        "bounds": [1e-4],
        "converged": False,
        "lanczos_hvps": 100,
        "mode": "eval",
        "lr_limit": 0.16,
        "lambda_min": -0.3,
        "trace": None,
    }
    text = render(dataclasses.replace(hand_built(), curvature=curvature))
    assert "λmax 12.5 (bound 1.0e-04, NOT converged, 100 HVPs, eval mode)" in text
    assert "lr limit 2/λmax = 0.16" in text and "λmin -0.3" in text
