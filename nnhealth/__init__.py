"""nnhealth: one-pass training-health diagnostics for PyTorch models.

    import nnhealth
    report = nnhealth.scan(model, (inputs, targets))
    assert report.ok(), report.findings

Importing nnhealth does not import torch; ``scan`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nnhealth.findings import Finding, Report, Severity
from nnhealth.options import DEFAULTS as _DEFAULTS

__version__ = "0.1.0"

__all__ = ["Finding", "Report", "Severity", "__version__", "scan"]

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def scan(
    model: Any,
    batch: Any = None,
    loss_fn: Callable | None = None,
    *,
    select: list[str] | None = _DEFAULTS["select"],
    ignore: list[str] | None = _DEFAULTS["ignore"],
    loss: str = _DEFAULTS["loss"],
    seed: int = _DEFAULTS["seed"],
    mode: str = _DEFAULTS["mode"],
    lr: float | None = _DEFAULTS["lr"],
    hessian: bool | None = _DEFAULTS["hessian"],
    hessian_top: int = _DEFAULTS["hessian_top"],
    hessian_min: bool = _DEFAULTS["hessian_min"],
    hessian_trace: int = _DEFAULTS["hessian_trace"],
    hessian_tol: float = _DEFAULTS["hessian_tol"],
    hessian_budget: int = _DEFAULTS["hessian_budget"],
    options: dict[str, dict[str, Any]] | None = None,
    what_if: bool = _DEFAULTS["what_if"],
    what_if_budget: float = _DEFAULTS["what_if_budget"],
    baseline: str | Path | None = _DEFAULTS["baseline"],
    baseline_tolerance: float = _DEFAULTS["baseline_tolerance"],
) -> Report:
    """Scan an in-memory ``model`` on ``batch`` (a tensor, ``(inputs, targets)`` or a dict).

    Without a ``batch``, one is inferred from the model's first layer (as ``nnhealth
    scan model.pt`` does; the report's ``run["batch"]["source"]`` says how) or
    ``NnhealthError`` says why none can be.

    The model is left exactly as it was found: train/eval mode, ``requires_grad``,
    ``.grad``, buffers (BatchNorm statistics) and hooks. ``loss_fn(output, targets)``
    overrides the automatic loss choice; ``lr`` is the learning rate the norm-ratio
    and curvature checks judge against. ``hessian=True`` (or selecting NH401) measures
    the Hessian's top ``hessian_top`` eigenvalues by Lanczos (and the smallest with
    ``hessian_min``, the trace with ``hessian_trace`` Hutchinson probes) to relative
    error ``hessian_tol`` within ``hessian_budget`` Hessian-vector products.
    ``what_if=True`` re-scans a copy of the model with each recommended fix applied
    (``Report.what_if``), within ``what_if_budget`` seconds. ``baseline`` (a file
    written by ``nnhealth scan --write-baseline``) marks each finding new, worse (its
    score grew by more than ``baseline_tolerance``), unchanged or fixed
    (``Report.baseline``). ``options`` overrides check thresholds, e.g.
    ``{"dead-relu": {"warn_fraction": 0.2}}``. Raises ``NnhealthError`` on bad input;
    its message names options by these keywords.
    """
    from torch import nn

    from nnhealth import pipeline
    from nnhealth.errors import UsageError
    from nnhealth.loading.batch import interpret
    from nnhealth.loading.model import LoadedModel
    from nnhealth.options import ScanOptions

    if not isinstance(model, nn.Module):
        raise UsageError(
            f"scan() takes a torch.nn.Module, not {type(model).__name__}: for a file, run "
            "`nnhealth scan PATH` (it loads safely), or load the module yourself"
        )
    loaded = LoadedModel(
        model=model, format="in-memory module", source=type(model).__name__, loss_fn=loss_fn
    )
    opts = ScanOptions(
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
    return pipeline.run(
        loaded,
        None if batch is None else interpret(batch, "batch"),
        opts,
        what_if=what_if,
        what_if_budget=what_if_budget,
        baseline=baseline,
        baseline_tolerance=baseline_tolerance,
    )
