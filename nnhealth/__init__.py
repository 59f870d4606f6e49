"""nnhealth: one-pass training-health diagnostics for PyTorch models.

    import nnhealth
    report = nnhealth.scan(model, (inputs, targets))
    assert report.ok(), report.findings

Importing nnhealth does not import torch; ``scan`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nnhealth.findings import Finding, Report, Severity

__version__ = "0.1.0"

__all__ = ["Finding", "Report", "Severity", "__version__", "scan"]

if TYPE_CHECKING:
    from collections.abc import Callable


def scan(
    model: Any,
    batch: Any,
    loss_fn: Callable | None = None,
    *,
    select: list[str] | None = None,
    ignore: list[str] | None = None,
    loss: str = "auto",
    seed: int = 0,
    mode: str = "train",
    lr: float | None = None,
    hessian: bool | None = None,
    hessian_top: int = 1,
    hessian_min: bool = False,
    hessian_trace: int = 0,
    hessian_tol: float = 1e-3,
    hessian_budget: int = 100,
    options: dict[str, dict[str, Any]] | None = None,
    what_if: bool = False,
) -> Report:
    """Scan an in-memory ``model`` on ``batch`` (a tensor, ``(inputs, targets)`` or a dict).

    The model is left exactly as it was found: train/eval mode, ``requires_grad``,
    ``.grad``, buffers (BatchNorm statistics) and hooks. ``loss_fn(output, targets)``
    overrides the automatic loss choice; ``lr`` is the learning rate the norm-ratio
    and curvature checks judge against. ``hessian=True`` (or selecting NH401) measures the Hessian's top
    ``hessian_top`` eigenvalues by Lanczos (and the smallest with ``hessian_min``, the
    trace with ``hessian_trace`` Hutchinson probes) to relative error ``hessian_tol``
    within ``hessian_budget`` Hessian-vector products. ``what_if=True`` re-scans a copy
    of the model with each recommended fix applied (``Report.what_if``). ``options`` overrides check thresholds, e.g.
    ``{"dead-relu": {"warn_fraction": 0.2}}``. Raises ``NnhealthError`` on bad input.
    """
    from nnhealth import runner
    from nnhealth.loading.batch import interpret
    from nnhealth.loading.model import LoadedModel

    loaded = LoadedModel(
        model=model, format="in-memory module", source=type(model).__name__, loss_fn=loss_fn
    )
    opts = runner.ScanOptions(
        select=select,
        ignore=ignore,
        loss=loss,
        seed=seed,
        mode=mode,
        lr=lr,
        hessian=hessian,
        hessian_top=hessian_top,
        hessian_min=hessian_min,
        hessian_trace=hessian_trace,
        hessian_tol=hessian_tol,
        hessian_budget=hessian_budget,
        check_options=dict(options or {}),
    )
    parsed = interpret(batch, "batch")
    report = runner.run(loaded, parsed, opts)
    if what_if:
        from dataclasses import replace

        from nnhealth.whatif import explore

        report = replace(report, what_if=explore(loaded, parsed, opts, report))
    return report
