"""Gate a test suite on gradient health in one line.

from nnhealth.testing import assert_healthy

def test_model_trains():
    assert_healthy(build_model(), (inputs, targets))
"""

from __future__ import annotations

from typing import Any

from nnhealth.findings import Report, Severity


def assert_healthy(
    model: Any,
    batch: Any,
    loss_fn: Any = None,
    *,
    fail_on: Severity | str = Severity.ERROR,
    **options: Any,
) -> Report:
    """Scan ``model`` on ``batch``; raise AssertionError with the text report when a
    finding is at or above ``fail_on`` (or a check failed). Returns the report otherwise.

    ``options`` are those of :func:`nnhealth.scan` (select, ignore, lr, hessian...).
    The model is left exactly as it was found.
    """
    from nnhealth import scan
    from nnhealth.formatters import RenderOptions, get_formatter

    report = scan(model, batch, loss_fn, **options)
    if not report.ok(fail_on):
        text = get_formatter("text", RenderOptions(width=120, quiet=True)).render(report)
        threshold = Severity.parse(fail_on).label
        raise AssertionError(f"nnhealth found problems at or above {threshold}:\n{text}")
    return report
