"""--what-if: check the advice by re-scanning a copy of the model with each fix applied.

For every warning or error whose fix can be applied in memory (a re-initialization, a
bias reset, a swapped nonlinearity, normalization inserted after layers, noise to break
a tie, a lower learning rate or layer-wise LARS rates checked by a few SGD steps), the
fix is applied to a deep copy, the finding's check runs again on the same batch, and
the result records the metric before and after. The model itself is never modified.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from nnhealth._util import Progress, escaped
from nnhealth.analyzers._advice import RELU_FAMILY
from nnhealth.baseline import score
from nnhealth.capture.instrument import call_model
from nnhealth.findings import Finding, Report, Severity
from nnhealth.loading.batch import Batch, prepare
from nnhealth.loading.loss import LossResolver
from nnhealth.loading.model import LoadedModel

SGD_STEPS = 5
JUDGED = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class Fix:
    label: str
    # mutates the copy; returns None when applied, else why it cannot be
    apply: Callable[[nn.Module], str | None] | None = None
    # instead of a re-scan: a training check on a copy, returning (before, after, note)
    train: Callable[[nn.Module], tuple[float, float, str]] | None = None


def _reinit(module: nn.Module, nonlinearity: str | None, bias: float = 0.0) -> None:
    with torch.no_grad():
        if nonlinearity in RELU_FAMILY:
            name = "leaky_relu" if nonlinearity in {"leaky_relu", "prelu", "rrelu"} else "relu"
            nn.init.kaiming_normal_(module.weight, nonlinearity=name)
        elif nonlinearity in {"tanh", "sigmoid", "hardtanh", "hardsigmoid"}:
            gain = "tanh" if nonlinearity in {"tanh", "hardtanh"} else "sigmoid"
            nn.init.xavier_normal_(module.weight, gain=nn.init.calculate_gain(gain))
        else:
            nn.init.kaiming_normal_(module.weight, nonlinearity="linear")  # LeCun
        if getattr(module, "bias", None) is not None:
            module.bias.fill_(bias)


def init_name(nonlinearity: str | None) -> str:
    if nonlinearity in RELU_FAMILY:
        return "kaiming_normal_"
    if nonlinearity in {"tanh", "sigmoid", "hardtanh", "hardsigmoid"}:
        return "xavier_normal_"
    return "LeCun init"


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(_get(model, parent), attr, new)


def _norm_after(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](module.out_channels)
    else:
        norm = nn.LayerNorm(module.out_features)
    return nn.Sequential(module, norm.to(next(module.parameters()).device))


class _Context:
    """What the fixes need to know about the scanned model."""

    def __init__(self, report: Report) -> None:
        self.rows = list(report.layers)
        kinds = Counter(r["kind"] for r in self.rows if r.get("role") == "activation")
        self.nonlinearity = kinds.most_common(1)[0][0] if kinds else None

    def feeder(self, site: str) -> dict[str, Any] | None:
        """The layer (or norm layer) row just before the nonlinearity row ``site``."""
        names = [r["name"] for r in self.rows]
        if site not in names:
            return None
        before = self.rows[: names.index(site)]
        return next((r for r in reversed(before) if r.get("role") in ("layer", "norm")), None)

    def row(self, site: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["name"] == site), None)

    def layer_names(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, JUDGED)]


def _all_layers(
    ctx: _Context, how: Callable[[nn.Module], None]
) -> Callable[[nn.Module], str | None]:
    def apply(model: nn.Module) -> str | None:
        names = ctx.layer_names(model)
        if not names:
            return "no Linear/Conv layers to change"
        for name in names:
            how(_get(model, name))
        return None

    return apply


def candidates(
    f: Finding,
    ctx: _Context,
    opts: Any,
    curvature: dict | None,
    sgd: Callable[..., tuple[float, float, str]],
) -> list[Fix]:
    nl = ctx.nonlinearity
    if f.code == "NH101" and f.layer:
        fixes = []
        feeder = ctx.feeder(f.layer)
        if feeder is not None and feeder.get("role") == "norm":

            def reset_norm(model, m=feeder["module"]):
                norm = _get(model, m)
                with torch.no_grad():
                    norm.bias.zero_()
                    norm.weight.fill_(1.0)

            fixes.append(
                Fix(f"reset {feeder['module']} shift to 0", lambda mm, g=reset_norm: g(mm))
            )
        elif feeder is not None:
            fixes.append(
                Fix(
                    f"He init + bias 0.01 on {feeder['module']}",
                    lambda model, m=feeder["module"]: _reinit(_get(model, m), "relu", 0.01),
                )
            )
        row = ctx.row(f.layer) or {}
        if row.get("functional"):
            inside = row.get("module") or "the model"
            fixes.append(
                Fix(
                    "LeakyReLU(0.01)",
                    lambda model, where=inside: (
                        f"F.relu is called inside {where}.forward: it cannot be swapped from outside; "
                        "edit the forward to use F.leaky_relu"
                    ),
                )
            )
        else:
            where = row.get("module", f.layer)
            for new, label in (
                (lambda: nn.LeakyReLU(0.01), "LeakyReLU(0.01)"),
                (nn.GELU, "GELU()"),
            ):

                def swap(model, m=where, make=new):
                    _set(model, m, make())

                fixes.append(Fix(f"{label} for {where}", lambda mm, g=swap: g(mm)))
        return fixes
    if f.code == "NH102" and f.layer:
        feeder = ctx.feeder(f.layer)
        row = ctx.row(f.layer) or {}
        if feeder is None or feeder.get("role") != "layer":
            return []
        kind = row.get("kind")
        return [
            Fix(
                f"xavier_normal_ on {feeder['module']}",
                lambda model, m=feeder["module"], k=kind: _reinit(_get(model, m), k),
            )
        ]
    if f.code in ("NH201", "NH202", "NH601"):
        fixes = [
            Fix(f"{init_name(nl)} on every Linear/Conv", _all_layers(ctx, lambda m: _reinit(m, nl)))
        ]
        if nl in {"tanh", "sigmoid"}:
            fixes.append(
                Fix(
                    "orthogonal init on every Linear/Conv",
                    _all_layers(
                        ctx,
                        lambda m: (
                            nn.init.orthogonal_(m.weight, nn.init.calculate_gain(nl)),
                            m.bias is not None and nn.init.zeros_(m.bias),
                        ),
                    ),
                )
            )

        def insert_norms(model: nn.Module) -> str | None:
            names = ctx.layer_names(model)[:-1]  # not after the output layer
            if not names:
                return "no hidden Linear/Conv layers"
            for name in names:
                _set(model, name, _norm_after(_get(model, name)))
            return None

        fixes.append(Fix("LayerNorm/BatchNorm after each hidden layer", insert_norms))
        return fixes
    if f.code == "NH501" and f.layer and "exact" in f.evidence:  # weight symmetry

        def noise(model, m=f.layer):
            layer = _get(model, m)
            with torch.no_grad():
                scale = float(layer.weight.std()) or math.sqrt(1.0 / layer.weight.shape[1])
                layer.weight.add_(1e-2 * scale * torch.randn_like(layer.weight))

        return [
            Fix(
                f"{init_name(nl)} on {f.layer}",
                lambda model, m=f.layer: _reinit(_get(model, m), nl),
            ),
            Fix(f"1% noise on {f.layer}", lambda mm, g=noise: g(mm)),
        ]
    if f.code == "NH401" and curvature and curvature.get("lr_limit") and opts.lr:
        safe = curvature["lr_limit"] / 2
        return [Fix(f"lr {opts.lr:g} -> {safe:.3g}", train=lambda model: sgd(model, safe, opts.lr))]
    if f.code == "NH001" and "parameter" in f.evidence:
        module = str(f.evidence["parameter"]).rpartition(".")[0]
        return [
            Fix(
                f"{init_name(nl)} on {module} (instead of the non-finite values)",
                lambda model, m=module: _reinit(_get(model, m), nl),
            )
        ]
    if f.code == "NH301":
        fixes = []
        if "max_layer" in f.evidence:  # the spread: re-initialize the outlying layer
            ratios = {
                f.evidence["max_layer"]: f.evidence["max_ratio"],
                f.evidence["min_layer"]: f.evidence["min_ratio"],
            }
            median = f.evidence.get("median_ratio") or math.sqrt(math.prod(ratios.values()))
            outlier = max(ratios, key=lambda k: abs(math.log(ratios[k] / median)))
            module = outlier.rpartition(".")[0]
            fixes.append(
                Fix(
                    f"{init_name(nl)} on {module}",
                    lambda model, m=module: _reinit(_get(model, m), nl),
                )
            )
        if opts.lr:
            fixes.append(
                Fix(
                    "LARS-scaled layer rates",
                    train=lambda model: sgd(model, opts.lr, opts.lr, lars=True),
                )
            )
        return fixes
    return []


def _metric(f: Finding | None) -> str:
    if f is None:
        return "no finding"
    e = f.evidence
    if f.code == "NH101":
        return f"{100 * e.get('dead_fraction', 0):.0f}% dead"
    if f.code == "NH102":
        return f"{100 * e.get('saturated_values_fraction', 0):.0f}% saturated"
    if f.code in ("NH201", "NH202"):
        return f"x{e['factor_per_layer']:.3g}/layer" if "factor_per_layer" in e else f.message[:40]
    if f.code == "NH601":
        return (
            f"x{e['expected_change']:.3g} through depth"
            if "expected_change" in e
            else f"x{e.get('ratio', 0):.3g}"
        )
    if f.code == "NH501":
        return f"width {e.get('effective_width')}/{e.get('units')}"
    return f.message[:60]


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
    from nnhealth import runner
    from nnhealth.baseline import key

    ctx = _Context(report)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []

    def sgd(
        model: nn.Module, lr: float, old_lr: float, lars: bool = False
    ) -> tuple[float, float, str]:
        return _sgd_check(model, batch, opts, loaded, lr, old_lr, lars)

    for f in report.findings:
        if f.severity < Severity.WARNING:
            continue
        for fix in candidates(f, ctx, opts, report.curvature, sgd):
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
            try:
                trial = copy.deepcopy(loaded.model)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 (a module that refuses copying: user code)
                note = f"the model cannot be copied for a trial: deepcopy {escaped(exc)}"
                results.append({**entry, "applied": False, "note": note[:300]})
                continue
            try:
                if fix.train is not None:
                    before, after, note = fix.train(trial)
                    lars = fix.label.startswith("LARS")
                    # a lower rate is confirmed when the old one raised the loss and the new
                    # one lowers it; LARS when its steps lower the loss at least as much
                    confirmed = after < 0 and (after <= before if lars else before > 0)
                    results.append(
                        {
                            **entry,
                            "applied": True,
                            "after": note,
                            "after_score": after,
                            "before_loss_change": before,
                            "resolved": confirmed,
                        }
                    )
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(opts.seed)
                    why_not = fix.apply(trial)
                if why_not:
                    results.append({**entry, "applied": False, "note": why_not})
                    continue
                sub = LoadedModel(
                    model=trial, format=loaded.format, source=loaded.source, loss_fn=loaded.loss_fn
                )
                # every check again, not just this one: a fix can hide one problem behind
                # another (a norm layer makes NH601 look away from a zero layer)
                rescan = runner.run(sub, batch, replace(opts, hessian=False))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 (the fix did not fit the model, e.g. a norm layer)
                note = f"could not be applied: the trial {escaped(exc)}"
                results.append({**entry, "applied": False, "note": note[:300]})
                continue
            same = [g for g in rescan.findings if g.code == f.code and g.layer == f.layer]
            after = max(same, key=lambda g: g.severity, default=None)
            before_keys = {g.key for g in report.findings if g.severity >= Severity.WARNING}
            new = sorted(
                g.key
                for g in rescan.findings
                if g.severity >= Severity.WARNING and g.key not in before_keys
            )
            remaining = sum(g.severity >= Severity.WARNING for g in rescan.findings)
            results.append(
                {
                    **entry,
                    "applied": True,
                    "after": _metric(after),
                    "after_score": score(after) if after else None,
                    "resolved": after is None or after.severity < Severity.WARNING,
                    "remaining_findings": remaining,
                    "new_findings": new,
                }
            )
    return tuple(results)


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
        resolver = LossResolver(opts.loss, prepared.targets, opts.seed, custom=loaded.loss_fn)
        params = [p for p in m.parameters() if p.requires_grad]

        def loss() -> torch.Tensor:
            return resolver(call_model(m, prepared.inputs))

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
