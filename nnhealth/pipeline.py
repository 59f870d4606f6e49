"""One scan, as ``nnhealth scan`` and ``nnhealth.scan`` both run it: the pass and its
checks (runner.run), then each recommended fix tried on a copy (what-if), then the
comparison with a baseline of accepted findings.

Loading from paths, rendering and the exit code stay with the caller.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from nnhealth.errors import UsageError, flag
from nnhealth.findings import Report
from nnhealth.options import DEFAULTS, check_values, validate

if TYPE_CHECKING:
    from nnhealth._util import Progress
    from nnhealth.loading.batch import Batch
    from nnhealth.loading.model import LoadedModel
    from nnhealth.options import ScanOptions


def run(
    loaded: LoadedModel,
    batch: Batch | None,
    opts: ScanOptions,
    *,
    what_if: bool = DEFAULTS["what_if"],
    what_if_budget: float = DEFAULTS["what_if_budget"],
    baseline: str | Path | None = DEFAULTS["baseline"],
    baseline_tolerance: float = DEFAULTS["baseline_tolerance"],
    progress: Progress | None = None,
) -> Report:
    """Scan ``loaded`` on ``batch`` with ``opts``; with ``what_if``, add the before/after
    of each fix (``Report.what_if``, within ``what_if_budget`` seconds); with a
    ``baseline`` file, add which findings are new, worse, unchanged or fixed
    (``Report.baseline``). Raises NnhealthError for what the user must fix."""
    from nnhealth import baseline as baselines
    from nnhealth import distributed, runner

    check_values(
        {
            "what_if": what_if,
            "what_if_budget": what_if_budget,
            "baseline": baseline,
            "baseline_tolerance": baseline_tolerance,
        }
    )
    # a baseline that cannot be read is refused before the scan, not after it
    accepted = baselines.read(Path(baseline)) if baseline is not None else None
    if loaded.model is not None:
        model = distributed.unwrapped(loaded.model)  # DDP's module; sharded: refused
        loaded = loaded if model is loaded.model else replace(loaded, model=model)
    ranks = distributed.current()
    if ranks is not None and loaded.model is not None:
        distributed.same_model(loaded.model, ranks)
    if what_if and ranks is not None:
        raise UsageError(
            f"{flag('what_if')} runs on one process: the trials stop on a time budget, "
            "which ranks would not reach together; scan without it across ranks, or with "
            "it on one process"
        )
    if batch is None and loaded.model is not None and _needs_pass(opts):
        from nnhealth.loading.batch import inferred

        if progress:
            progress("inferring a batch from the model")
        batch = inferred(loaded.model, opts.seed)
    validate(opts)
    optimizer = runner.scan_optimizer(loaded, opts)  # once: the scan's and the trials'
    report = runner.run(loaded, batch, opts, progress=progress, optimizer=optimizer)
    if what_if:
        if loaded.model is None or batch is None:
            raise UsageError(f"{flag('what_if')} needs a model and a batch (not a bare state_dict)")
        from nnhealth.whatif import explore

        tried = explore(
            loaded,
            batch,
            opts,
            report,
            optimizer[0],
            budget_seconds=what_if_budget,
            progress=progress,
        )
        report = replace(report, what_if=tried)
    if accepted is not None:
        compared = baselines.compare(report, accepted, baseline_tolerance)
        report = replace(report, baseline={"file": str(baseline), **compared})
    return report


def _needs_pass(opts: ScanOptions) -> bool:
    """Whether the selected checks run the model (a batch is needed). Options the runner
    would refuse answer False: the runner then says what is wrong with them."""
    from nnhealth import runner
    from nnhealth.errors import NnhealthError
    from nnhealth.options import validate

    try:
        validate(opts)
        return runner.needs_pass(opts)
    except NnhealthError:
        return False
