"""NH301 norm-ratio."""

from __future__ import annotations

import math
import statistics

from nnhealth.analyzers._fixes import Fix, FixContext, lars_fix, reinit_fix
from nnhealth.analyzers.base import Check, Option, deviation
from nnhealth.capture.stats import Capture, ParamStats
from nnhealth.findings import Finding, Severity
from nnhealth.nonlinearities import init_rule

LARS_ETA = 1e-3  # the trust coefficient of You et al. (2017)

_LARS_SNIPPET = (
    "# LARS-style layer-wise rates: each weight matrix steps lr * eta * ||w|| / ||grad w||\n"
    "# (LAMB applies the same ratio to Adam's update; both are in torch-optimizer)\n"
    "eta = 1e-3\n"
    "for p in model.parameters():\n"
    "    if p.grad is not None and p.ndim > 1:\n"
    "        p.grad.mul_(eta * p.norm() / (p.grad.norm() + 1e-12))\n"
    "optimizer.step()"
)


def trust_ratio(p: ParamStats) -> float | None:
    """||w|| / ||grad w||; None when either is zero or unknown."""
    if p.grad_norm is None or p.grad_norm == 0 or p.norm == 0:
        return None
    return p.norm / p.grad_norm


class NormRatio(Check):
    """Per-layer weight-to-gradient norm ratios (the LARS trust ratio) far apart.

    What it detects:
        For each weight matrix (Linear, Conv, Embedding...): ||w||, ||grad w|| and the
        ratio ||w|| / ||grad w||. A spread of the ratio over orders of magnitude across
        layers means one global learning rate is too large for some layers and too small
        for others. With ``--lr`` it also computes each layer's relative update
        lr * ||grad w|| / ||w|| and flags layers whose step would be far too large
        (divergence risk) or too small (frozen). Biases and normalization parameters are
        reported apart (in the layer table and JSON), not mixed into the spread; zero
        weights (NH501) and zero gradients (NH101) are left out of it.

    Why it matters:
        SGD moves every layer by lr * ||grad w||: a layer whose ratio is 1e4 times
        another's changes 1e4 times more slowly relative to its size. LARS (You et al.,
        2017) was made for exactly this: in large-batch training the ratio differs across
        layers by orders of magnitude, so each layer gets its own rate
        eta * ||w|| / ||grad w||. A relative update above ~0.1 per step rewrites a layer
        in a few steps; below ~1e-6 it does not learn.

    Example:
        A BatchNorm network with one layer's weights scaled by 100: BatchNorm makes the
        output scale-invariant, so that layer's gradient shrinks 100x while its norm grows
        100x: its ratio is 1e4 times the others'.

    How to fix:
        Use layer-wise adaptive rates: LARS for SGD, LAMB for Adam (local rate
        eta * ||w|| / ||grad w||, eta ~ 1e-3); or re-initialize the outlying layers; with
        ``--lr``, lower the rate for layers whose relative update is too large (or the
        global rate, with warmup), raise it or check for dead paths where it is too small.
    """

    code = "NH301"
    name = "norm-ratio"
    summary = "per-layer ||w||/||grad w|| (LARS trust ratio) spread over orders of magnitude"
    needs = frozenset({"weights", "gradients"})
    options = (
        Option(
            "spread_warn",
            1000.0,
            "three orders of magnitude; a healthy BatchNorm network's head already sits "
            "10-100x below its normalized layers",
        ),
        Option("lr", None, "the learning rate, from --lr; enables the relative-update findings"),
        Option("update_high", 0.1, "a step that changes a layer by 10% rewrites it in ~10 steps"),
        Option("update_error", 1.0, "a step as large as the weights themselves diverges"),
        Option(
            "update_low", 1e-6, "1000x below the ~1e-3 of healthy training: the layer is frozen"
        ),
    )

    def _weights(self, capture: Capture) -> list[ParamStats]:
        return [p for p in capture.params if p.role == "weight" and p.trainable]

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        out = []
        rated = [(p, trust_ratio(p)) for p in self._weights(capture)]
        rated = [(p, r) for p, r in rated if r is not None]
        if len(rated) >= 2:
            lo = min(rated, key=lambda pr: pr[1])
            hi = max(rated, key=lambda pr: pr[1])
            spread = hi[1] / lo[1]
            if spread >= options["spread_warn"]:
                median = statistics.median(r for _, r in rated)
                out.append(self._spread_finding(lo, hi, spread, len(rated), median, options))
        lr = options.get("lr")
        if lr is not None:
            for p, r in rated:
                update = lr / r
                if update >= options["update_high"]:
                    sev = Severity.ERROR if update >= options["update_error"] else Severity.WARNING
                    out.append(
                        self.finding(
                            sev,
                            p.module or None,
                            f"at lr {lr:g} one SGD step changes {p.name} by {update:.3g} of its "
                            f"norm (||grad w|| = {p.grad_norm:.3g}, ||w|| = {p.norm:.3g}): "
                            "divergence risk",
                            {
                                "lr": lr,
                                "relative_update": update,
                                "weight_norm": p.norm,
                                "grad_norm": p.grad_norm,
                            },
                            f"lower this layer's rate to about {lr * 1e-3 / update:.3g} (a 1e-3 "
                            "relative update), clip gradients, or use LARS/LAMB",
                            _LARS_SNIPPET,
                        )
                    )
                elif update <= options["update_low"]:
                    out.append(
                        self.finding(
                            Severity.WARNING,
                            p.module or None,
                            f"at lr {lr:g} one SGD step changes {p.name} by {update:.3g} of its "
                            "norm: the layer is effectively frozen",
                            {
                                "lr": lr,
                                "relative_update": update,
                                "weight_norm": p.norm,
                                "grad_norm": p.grad_norm,
                            },
                            "raise this layer's rate (LARS/LAMB do it per layer), or find why "
                            "its gradient is so small (NH202, NH101, NH102)",
                            _LARS_SNIPPET,
                        )
                    )
        return out

    def _spread_finding(
        self, lo, hi, spread: float, n: int, median: float, options: dict
    ) -> Finding:
        (plo, rlo), (phi, rhi) = lo, hi
        lr = options.get("lr")
        rates = ""
        if lr is not None:
            rates = (
                f"; LARS would step {phi.name} at {lr * LARS_ETA * rhi:.3g} and {plo.name} at "
                f"{lr * LARS_ETA * rlo:.3g} (lr x {LARS_ETA:g} x ratio)"
            )
        return self.finding(
            Severity.WARNING,
            None,
            f"the weight-to-gradient norm ratio spans x{spread:.3g} across {n} weight matrices: "
            f"{rlo:.3g} at {plo.name}, {rhi:.3g} at {phi.name}; one global learning rate "
            f"cannot suit both{rates}",
            {
                "spread": spread,
                "min_ratio": rlo,
                "min_layer": plo.name,
                "max_ratio": rhi,
                "max_layer": phi.name,
                "layers": n,
                "median_ratio": median,
            },
            "use layer-wise adaptive rates: LARS for SGD, LAMB for Adam (local rate "
            f"eta * ||w|| / ||grad w||, eta = {LARS_ETA:g}); or re-initialize the outlying layers",
            _LARS_SNIPPET,
            kind="spread",
        )

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        lr = options.get("lr")
        rows: dict[str, dict] = {}
        for p in capture.params:
            r = trust_ratio(p)
            key = (
                "trust_ratio" if p.role == "weight" else f"{p.name.rsplit('.', 1)[-1]}_trust_ratio"
            )
            row = rows.setdefault(p.module, {})
            row[key] = r
            if p.role == "weight":
                row["grad_norm"] = p.grad_norm
                row["lars_local_rate"] = None if r is None else LARS_ETA * r
                if lr is not None and r is not None:
                    row["relative_update"] = lr / r
        return rows

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        fixes = []
        e = finding.evidence
        if "max_layer" in e:  # the spread: re-initialize the outlying layer
            ratios = {e["max_layer"]: e["max_ratio"], e["min_layer"]: e["min_ratio"]}
            median = e.get("median_ratio") or math.sqrt(math.prod(ratios.values()))
            outlier = max(ratios, key=lambda k: abs(math.log(ratios[k] / median)))
            module = outlier.rpartition(".")[0]
            rule = init_rule(ctx.nonlinearity)
            fixes.append(reinit_fix(f"{rule.name} on {module}", module, rule))
        if ctx.lr:
            fixes.append(lars_fix(ctx))
        return fixes

    def score(self, finding: Finding) -> float | None:
        e = finding.evidence
        return e.get("spread") or deviation(e.get("relative_update"), 1e-3)

    def label(self, finding: Finding) -> str:
        return finding.message[:60]
