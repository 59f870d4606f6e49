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
    options: dict[str, dict[str, Any]] | None = None,
) -> Report:
    """Scan an in-memory ``model`` on ``batch`` (a tensor, ``(inputs, targets)`` or a dict).

    The model is left exactly as it was found: train/eval mode, ``requires_grad``,
    ``.grad``, buffers (BatchNorm statistics) and hooks. ``loss_fn(output, targets)``
    overrides the automatic loss choice; ``lr`` is the learning rate the norm-ratio
    check judges each layer's relative update with. ``options`` overrides check thresholds, e.g.
    ``{"dead-relu": {"warn_fraction": 0.2}}``. Raises ``NnhealthError`` on bad input.
    """
    from nnhealth import runner
    from nnhealth.loading.batch import interpret
    from nnhealth.loading.model import LoadedModel

    loaded = LoadedModel(model=model, format="in-memory module", source=type(model).__name__,
                         loss_fn=loss_fn)
    opts = runner.ScanOptions(select=select, ignore=ignore, loss=loss, seed=seed, mode=mode,
                              lr=lr, check_options=dict(options or {}))
    return runner.run(loaded, interpret(batch, "batch"), opts)
