"""--what-if: check the advice by re-scanning a copy of the model with each fix applied.

For every warning or error whose fix can be applied in memory (a re-initialization, a
bias reset, a swapped nonlinearity, normalization inserted after layers, noise to break
a tie, a lower learning rate or layer-wise LARS rates checked by a few SGD steps), the
fix is applied to a deep copy, the finding's check runs again on the same batch, and
the result records the metric before and after. The model itself is never modified.
Each check says which fixes it has (``Check.fixes``) and how its metric reads
(``Check.label``); this module only runs them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from nnhealth._util import Progress, escaped
from nnhealth.analyzers import lookup
from nnhealth.analyzers._fixes import Fix, FixContext
from nnhealth.baseline import key, score
from nnhealth.capture.instrument import call_model
from nnhealth.errors import report_text
from nnhealth.findings import Finding, Report, Severity
from nnhealth.loading.batch import Batch, prepare
from nnhealth.loading.loss import objective
from nnhealth.loading.model import LoadedModel

SGD_STEPS = 5


def candidates(f: Finding, ctx: FixContext) -> list[Fix]:
    """The fixes the finding's check can apply in memory."""
    check = lookup(f.code)
    return [] if check is None else check().fixes(f, ctx)


def _metric(f: Finding | None) -> str:
    if f is None:
        return "no finding"
    check = lookup(f.code)
    return f.message[:60] if check is None else check().label(f)


def explore(
    loaded: LoadedModel,
    batch: Batch,
    opts: Any,
    report: Report,
    *,
    budget_seconds: float = 120.0,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], ...]:
    """Before/after for each applicable fix of each warning or error in ``report``."""

    def sgd(
        model: nn.Module, lr: float, old_lr: float, lars: bool = False
    ) -> tuple[float, float, str]:
        return _sgd_check(model, batch, opts, loaded, lr, old_lr, lars)

    ctx = FixContext.of(report, opts.lr, sgd)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for f in report.findings:
        if f.severity < Severity.WARNING:
            continue
        for fix in candidates(f, ctx):
            entry: dict[str, Any] = {
                "finding": key(f),
                "code": f.code,
                "check": f.check,
                "layer": f.layer,
                "fix": fix.label,
                "before": _metric(f),
                "before_score": score(f),
            }
            if time.perf_counter() - started > budget_seconds:
                results.append({**entry, "applied": False, "note": "skipped: time budget spent"})
                continue
            if progress:
                progress(f"what-if: {f.check} {f.layer or ''} <- {fix.label}")
            results.append({**entry, **_trial(loaded, batch, opts, report, f, fix)})
    return tuple(results)


def _trial(
    loaded: LoadedModel, batch: Batch, opts: Any, report: Report, f: Finding, fix: Fix
) -> dict[str, Any]:
    """The outcome of ``fix`` on a copy of the model: a training check's numbers, or a
    re-scan's finding for the same check and layer."""
    from nnhealth import runner

    try:
        trial = copy.deepcopy(loaded.model)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 (a module that refuses copying: user code)
        note = report_text(f"the model cannot be copied for a trial: deepcopy {escaped(exc)}")
        return {"applied": False, "note": note[:300]}
    try:
        if fix.train is not None:
            before, after, note, confirmed = fix.train(trial)
            return {
                "applied": True,
                "after": note,
                "after_score": after,
                "before_loss_change": before,
                "resolved": confirmed,
            }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            why_not = fix.apply(trial)
        if why_not:
            return {"applied": False, "note": why_not}
        sub = LoadedModel(
            model=trial, format=loaded.format, source=loaded.source, loss_fn=loaded.loss_fn
        )
        # every check again, not just this one: a fix can hide one problem behind
        # another (a norm layer makes init-scale look away from a zero layer)
        rescan = runner.run(sub, batch, replace(opts, hessian=False))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 (the fix did not fit the model, e.g. a norm layer)
        note = report_text(f"could not be applied: the trial {escaped(exc)}")
        return {"applied": False, "note": note[:300]}
    return _compare(report, rescan, f)


def _compare(report: Report, rescan: Report, f: Finding) -> dict[str, Any]:
    """The re-scan against the scan: the same check's finding on the same layer, and the
    warnings left or new."""
    same = [g for g in rescan.findings if g.code == f.code and g.layer == f.layer]
    after = max(same, key=lambda g: g.severity, default=None)
    before_keys = {g.key for g in report.findings if g.severity >= Severity.WARNING}
    new = sorted(
        g.key
        for g in rescan.findings
        if g.severity >= Severity.WARNING and g.key not in before_keys
    )
    return {
        "applied": True,
        "after": _metric(after),
        "after_score": score(after) if after else None,
        "resolved": after is None or after.severity < Severity.WARNING,
        "remaining_findings": sum(g.severity >= Severity.WARNING for g in rescan.findings),
        "new_findings": new,
    }


def _sgd_check(
    model: nn.Module,
    batch: Batch,
    opts: Any,
    loaded: LoadedModel,
    lr: float,
    old_lr: float,
    lars: bool,
) -> tuple[float, float, str]:
    """Loss change over a few full-batch SGD steps at ``old_lr`` and at the fixed rate
    (or with LARS-scaled layer rates); negative is a decrease."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prepared = prepare(batch, dtype, device)

    def run(m: nn.Module, rate: float, scaled: bool) -> float:
        m.train(opts.mode == "train")
        # the scan's objective: the same labels passed through, the same loss
        inputs, resolver = objective(
            m, prepared.inputs, prepared.targets, opts.loss, opts.seed, loaded.loss_fn
        )
        params = [p for p in m.parameters() if p.requires_grad]

        def loss() -> torch.Tensor:
            return resolver(call_model(m, inputs))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            start = float(loss().detach())
            for _ in range(SGD_STEPS):
                grads = torch.autograd.grad(loss(), params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        if g is None:
                            continue
                        step = rate
                        if scaled and p.ndim > 1:  # LARS: eta * ||w|| / ||g||, eta from lr
                            step = rate * 1e-3 * float(p.norm()) / (float(g.norm()) + 1e-12)
                        p.sub_(step * g)
            end = float(loss().detach())
        return end - start if math.isfinite(end) else math.inf

    baseline_change = run(copy.deepcopy(model), old_lr, False)
    change = run(model, lr, lars)
    how = "LARS" if lars else f"lr {lr:.3g}"
    verdict = "loss falls" if change < 0 else "loss rises"
    note = (
        f"{SGD_STEPS} SGD steps: lr {old_lr:g} changes the loss by {baseline_change:+.3g}, "
        f"{how} by {change:+.3g} ({verdict})"
    )
    return baseline_change, change, note
