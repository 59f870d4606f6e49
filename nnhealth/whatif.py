"""--what-if: check the advice by re-scanning a copy of the model with each fix applied.

For every warning or error whose fix can be applied in memory (a re-initialization, a
bias reset, a swapped nonlinearity, normalization inserted after layers, noise to break
a tie, a lower learning rate or layer-wise LARS/LAMB rates checked by a few steps of
the scan's optimizer, from its saved state), the
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
from nnhealth.optim import Optimizer, Stepper

TRAIN_STEPS = 5  # plain SGD; with momentum beta the oscillation needs ~1/(1-beta) to build


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
    optimizer: Optimizer,
    *,
    budget_seconds: float = 120.0,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], ...]:
    """Before/after for each applicable fix of each warning or error in ``report``; the
    training fixes step ``optimizer`` (the scan's, from its saved state)."""

    def train(
        model: nn.Module, lr: float, old_lr: float, lars: bool = False
    ) -> tuple[float, float, str]:
        return _train_check(model, batch, opts, loaded, optimizer, lr, old_lr, lars)

    ctx = FixContext.of(report, optimizer.lr, train)
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


def train_steps(optimizer: Optimizer) -> int:
    """Steps for a training check: 5 for plain SGD; with momentum beta (Adam's beta1)
    3/(1-beta), 30 at 0.9, the time heavy-ball needs for an unstable mode to outgrow
    the transient (at most 50)."""
    beta = optimizer.betas[0] if optimizer.kind in ("adam", "adamw", "lamb") else optimizer.momentum
    if beta <= 0:
        return TRAIN_STEPS
    return max(TRAIN_STEPS, min(50, math.ceil(round(3 / (1 - beta), 6))))


def _train_check(
    model: nn.Module,
    batch: Batch,
    opts: Any,
    loaded: LoadedModel,
    optimizer: Optimizer,
    lr: float,
    old_lr: float,
    layerwise: bool,
) -> tuple[float, float, str]:
    """Loss change over a few full-batch steps of the scan's optimizer (torch.optim's
    own, from the saved state) at ``old_lr`` and at the fixed rate, or, ``layerwise``,
    with its layer-wise counterpart (LARS for SGD, LAMB for Adam); negative is a
    decrease."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prepared = prepare(batch, dtype, device)
    fixed = optimizer
    if layerwise:  # LAMB reads Adam's moments; LARS's buffer is in trust-scaled units
        state = optimizer.state if optimizer.layerwise_kind == "lamb" else {}
        fixed = replace(optimizer, kind=optimizer.layerwise_kind, state=state)
    steps = train_steps(optimizer)

    def run(m: nn.Module, rate: float, opt: Optimizer) -> float:
        m.train(opts.mode == "train")
        # the scan's objective: the same labels passed through, the same loss
        inputs, resolver = objective(
            m, prepared.inputs, prepared.targets, opts.loss, opts.seed, loaded.loss_fn
        )
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]

        def loss() -> torch.Tensor:
            return resolver(call_model(m, inputs))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            stepper = Stepper(opt, named, rate)
            start = float(loss().detach())
            for _ in range(steps):
                grads = torch.autograd.grad(loss(), [p for _, p in named], allow_unused=True)
                stepper.step({n: g for (n, _), g in zip(named, grads, strict=True)})
            end = float(loss().detach())
        return end - start if math.isfinite(end) else math.inf

    baseline_change = run(copy.deepcopy(model), old_lr, optimizer)
    change = run(model, lr, fixed)
    how = fixed.name if layerwise else f"lr {lr:.3g}"
    verdict = "loss falls" if change < 0 else "loss rises"
    note = (
        f"{steps} {optimizer.name} steps: lr {old_lr:g} changes the loss by "
        f"{baseline_change:+.3g}, {how} by {change:+.3g} ({verdict})"
    )
    return baseline_change, change, note
