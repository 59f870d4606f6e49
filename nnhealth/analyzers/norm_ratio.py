"""NH301 norm-ratio."""

from __future__ import annotations

import math
import statistics

from nnhealth.analyzers._fixes import Fix, FixContext, lars_fix, lower_lr_fix, reinit_fix
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


def relative_update(p: ParamStats, lr: float, own_step: bool = False) -> float | None:
    """||the optimizer's step|| / ||w||: the step the scan's optimizer would take now
    (``update_norm``; ``own_step``: None where it takes none, a parameter outside it),
    else plain SGD's lr * ||grad w|| / ||w||."""
    if p.norm == 0:
        return None
    if p.update_norm is not None or own_step:
        return None if p.update_norm is None else p.update_norm / p.norm
    r = trust_ratio(p)
    return None if r is None else lr / r


def _grouped(
    capture: Capture, rated: list[tuple[ParamStats, float]], lr: float, options: dict
) -> tuple[list, list, list, list]:
    """The weights whose relative update is too large (not behind a norm layer, or an
    output layer beyond ``output_update_high``), too small, large behind a norm layer,
    and large at the output: each as (param, relative update)."""
    invariant = {w.param for w in capture.weights if w.followed_by == "norm"}
    outputs = {w.param for w in capture.weights if w.is_output}
    high, low, inv, head = [], [], [], []
    own = bool((capture.optimizer or {}).get("own_step"))
    for p, _ in rated:
        update = relative_update(p, lr, own)
        if update is None:
            continue
        if p.name in outputs and update >= options["output_update_high"]:
            high.append((p, update))
        elif p.name in invariant or p.name in outputs:
            if update >= options["update_high"]:
                (inv if p.name in invariant else head).append((p, update))
        elif update >= options["update_high"]:
            high.append((p, update))
        elif update <= options["update_low"]:
            low.append((p, update))
    return high, low, inv, head


def _step_name(capture: Capture) -> str:
    """ "SGD" or the scan's optimizer, and how its step was had when that matters."""
    opt = capture.optimizer or {}
    name = opt.get("name", "SGD")
    if opt.get("adaptive") and not opt.get("state"):
        return f"{name} (first step, no saved state: about lr per coordinate)"
    return name


def _names(items: list[ParamStats], limit: int = 4) -> str:
    shown = ", ".join(p.name for p in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def isolated_outlier(rated: list[tuple[ParamStats, float]], gap: float) -> ParamStats | None:
    """The one weight whose ratio is at least ``gap`` times away from every other
    weight's (of three or more): a layer on its own scale, not a family of layers."""
    if len(rated) < 3:
        return None
    ordered = sorted(rated, key=lambda pr: pr[1])
    ends = [
        (ordered[0], ordered[1][1] / ordered[0][1]),
        (ordered[-1], ordered[-1][1] / ordered[-2][1]),
    ]
    (p, _), ratio = max(ends, key=lambda e: e[1])
    return p if ratio >= gap else None


class NormRatio(Check):
    """Per-layer weight-to-gradient norm ratios (the LARS trust ratio) far apart.

    What it detects:
        For each weight matrix or filter bank of a Linear, Conv, Embedding, recurrent or
        attention layer: ||w||, ||grad w|| and the ratio ||w|| / ||grad w||. Free tensors
        (class tokens, positional embeddings, ConvNeXt/CaiT layer scale), biases and
        normalization parameters are reported apart (in the layer table and JSON), not
        mixed into the spread; so are embedding tables whose batch leaves rows untouched
        (their ratio over the whole table is not a layer's), zero weights (NH501) and
        zero gradients (NH101). A spread of the ratio over orders of magnitude is a
        hint (info) that layer-wise rates (LARS/LAMB) would help: stock architectures
        have it by design (a layer-scaled branch's gradient is 1e-6 of the stream's).
        It is a warning when one layer sits alone, ``outlier_gap`` away from every other
        layer, for the SGD family only: Adam and RMSprop divide each coordinate's step by
        its gradient's scale, LARS and LAMB rescale each layer by its trust ratio. With
        an lr (``--lr`` or the saved optimizer's) it computes each layer's relative
        update ||delta w|| / ||w||, the step the scan's optimizer would take now
        (torch.optim's own step on a copy, from the saved state: SGD lr * ||grad w|| /
        ||w||; Adam about lr per coordinate, lr * sqrt(n) / ||w||, on its first step),
        and reports, grouped, the layers whose step is far too large (divergence
        risk) or too small (frozen). Weights followed by a normalization layer are
        scale-invariant: their relative update makes ||w|| grow (the gradient is
        orthogonal to w), which shrinks their effective step lr / ||w||^2 (van Laarhoven
        2017; Arora et al. 2019); they are not a divergence risk, and are reported
        together, as a warning only beyond ``invariant_extreme``. The output layer's
        relative update is reported as info up to ``output_update_high``: its scale is
        learned (a zero-initialized or std-0.01 head is standard), and whether the lr
        suits it is the curvature's question; beyond that it counts as a divergence.

    Why it matters:
        SGD moves every layer by lr * ||grad w||: a layer whose ratio is 1e4 times
        another's changes 1e4 times more slowly relative to its size. LARS (You et al.,
        2017) was made for exactly this: in large-batch training the ratio differs across
        layers by orders of magnitude, so each layer gets its own rate
        eta * ||w|| / ||grad w||. A relative update above ~0.1 per step rewrites a layer
        (that is not scale-invariant) in a few steps; below ~1e-6 it does not learn.

    Example:
        A BatchNorm network with one layer's weights scaled by 100: BatchNorm makes the
        output scale-invariant, so that layer's gradient shrinks 100x while its norm grows
        100x: its ratio is 1e4 times the others', and its effective step 1e-4 of theirs.

    How to fix:
        Use layer-wise adaptive rates: LARS for SGD, LAMB for Adam (local rate
        eta * ||w|| / ||grad w||, eta ~ 1e-3); or re-initialize the outlying layer; with
        ``--lr``, lower the rate (or use warmup) when layers that are not followed by a
        normalization layer step too far, raise it or check for dead paths where it is
        too small.
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
            "10-100x below its normalized layers (reported as info: a LARS hint)",
        ),
        Option(
            "outlier_gap",
            100.0,
            "one layer 100x from every other layer's ratio: stock models spread their "
            "ratios over families of layers, none sits alone by 100x",
        ),
        Option("lr", None, "the learning rate, from --lr; enables the relative-update findings"),
        Option("update_high", 0.1, "a step that changes a layer by 10% rewrites it in ~10 steps"),
        Option("update_error", 1.0, "a step as large as the weights themselves diverges"),
        Option(
            "update_low", 1e-6, "1000x below the ~1e-3 of healthy training: the layer is frozen"
        ),
        Option(
            "output_update_high",
            10.0,
            "the output layer's scale is learned and may start small (std 0.01) or at 0, "
            "so a step of 10-100% of it is normal early on; one of 10x its norm is not",
        ),
        Option(
            "invariant_extreme",
            1e4,
            "a scale-invariant layer whose first step grows ||w|| 1e4x has its effective "
            "step cut 1e8x: it stops learning until weight decay shrinks it back",
        ),
    )

    def _weights(self, capture: Capture) -> list[ParamStats]:
        return [p for p in capture.params if p.role == "weight" and p.trainable]

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        rated = [(p, trust_ratio(p)) for p in self._weights(capture)]
        rated = [(p, r) for p, r in rated if r is not None]
        updates = self._update_findings(capture, rated, options)
        out = []
        if len(rated) >= 2:
            lo = min(rated, key=lambda pr: pr[1])
            hi = max(rated, key=lambda pr: pr[1])
            spread = hi[1] / lo[1]
            if spread >= options["spread_warn"]:
                median = statistics.median(r for _, r in rated)
                outlier = isolated_outlier(rated, options["outlier_gap"])
                severe = outlier is not None or any(f.severity >= Severity.WARNING for f in updates)
                kind = (capture.optimizer or {}).get("kind", "sgd")
                # LARS/LAMB rescale each layer; Adam and RMSprop divide out the gradient's scale
                severe = severe and kind in ("sgd", "momentum", "nesterov")
                out.append(
                    self._spread_finding(lo, hi, spread, len(rated), median, options, severe, kind)
                )
        return out + updates

    def _update_findings(
        self, capture: Capture, rated: list[tuple[ParamStats, float]], options: dict
    ) -> list[Finding]:
        lr = options.get("lr")
        if lr is None:
            return []
        high, low, inv, head = _grouped(capture, rated, lr, options)
        out = []
        step = _step_name(capture)
        if high:
            out.append(self._divergence(high, lr, options, step))
        if low:
            out.append(self._frozen(low, lr, step))
        if inv:
            out.append(self._invariant(inv, lr, options, step))
        if head:
            out.append(self._output_layer(head, lr, step))
        return out

    @staticmethod
    def _evidence(group: list[tuple[ParamStats, float]], lr: float) -> dict:
        p, update = max(group, key=lambda pu: pu[1])
        lo = min(u for _, u in group)
        return {
            "lr": lr,
            "layers": len(group),
            "relative_update": update,
            "min_relative_update": lo,
            "weight_norm": p.norm,
            "grad_norm": p.grad_norm,
        }

    def _divergence(self, group, lr: float, options: dict, step: str) -> Finding:
        group = sorted(group, key=lambda pu: -pu[1])
        p, update = group[0]
        sev = Severity.ERROR if update >= options["update_error"] else Severity.WARNING
        return self.finding(
            sev,
            p.module or None,
            f"at lr {lr:g} one {step} step changes {len(group)} weight matrix(es) by "
            f"{group[-1][1]:.3g} to {update:.3g} of their norm ({_names([q for q, _ in group])}; "
            f"{p.name}: ||grad w|| = {p.grad_norm:.3g}, ||w|| = {p.norm:.3g}), and no "
            "normalization layer follows them to absorb it: divergence risk",
            self._evidence(group, lr),
            f"lower the rate to about {lr * 1e-3 / update:.3g} for these layers (a 1e-3 "
            "relative update for the worst), clip gradients, or use LARS/LAMB",
            _LARS_SNIPPET,
            kind="divergence",
        )

    def _frozen(self, group, lr: float, step: str) -> Finding:
        group = sorted(group, key=lambda pu: pu[1])
        p, update = group[0]
        return self.finding(
            Severity.WARNING,
            p.module or None,
            f"at lr {lr:g} one {step} step changes {len(group)} weight matrix(es) by "
            f"{update:.3g} to {group[-1][1]:.3g} of their norm ({_names([q for q, _ in group])}): "
            "effectively frozen",
            self._evidence(group, lr),
            "raise these layers' rate (LARS/LAMB do it per layer), or find why their "
            "gradient is so small (NH202, NH101, NH102)",
            _LARS_SNIPPET,
            kind="frozen",
        )

    def _invariant(self, group, lr: float, options: dict, step: str) -> Finding:
        group = sorted(group, key=lambda pu: -pu[1])
        p, update = group[0]
        extreme = update >= options["invariant_extreme"]
        return self.finding(
            Severity.WARNING if extreme else Severity.INFO,
            p.module or None,
            f"at lr {lr:g} one {step} step changes {len(group)} weight matrix(es) followed by a "
            f"normalization layer by up to {update:.3g} of their norm "
            f"({_names([q for q, _ in group])}): they are scale-invariant, so the step "
            "(orthogonal to w) grows ||w|| to about sqrt(1 + u^2) times itself and cuts "
            "their effective step lr / ||w||^2 instead of diverging"
            + (f"; at u = {update:.3g} they stop learning for a long time" if extreme else ""),
            self._evidence(group, lr),
            "nothing to do at moderate values (the norm settles in a few steps; weight decay "
            "keeps it in range); if extreme, use warmup or LARS/LAMB",
            _LARS_SNIPPET if extreme else None,
            kind="scale-invariant",
        )

    def _output_layer(self, group, lr: float, step: str) -> Finding:
        p, update = max(group, key=lambda pu: pu[1])
        return self.finding(
            Severity.INFO,
            p.module or None,
            f"at lr {lr:g} one {step} step changes the output layer {p.name} by {update:.3g} of "
            "its norm: its scale is set by training, not by its init (it may start at 0, as "
            "ViT's head does), so this is no divergence risk by itself; the learning rate "
            "against the loss's curvature is NH401's (--hessian)",
            self._evidence(group, lr),
            "nothing to do unless NH401 reports the lr above its stability limit",
            kind="output-layer",
        )

    def _spread_finding(
        self,
        lo,
        hi,
        spread: float,
        n: int,
        median: float,
        options: dict,
        severe: bool,
        kind: str = "sgd",
    ) -> Finding:
        (plo, rlo), (phi, rhi) = lo, hi
        lr = options.get("lr")
        rates = ""
        if kind in ("lars", "lamb"):
            rates = (
                f"; {kind.upper()} already scales each layer's step by its trust ratio "
                "(||w|| / ||step||), which is what this spread asks for"
            )
        elif kind in ("adam", "adamw", "rmsprop"):
            rates = (
                "; the optimizer divides each coordinate's step by its gradient's scale, so "
                "the spread does not reach its steps (see the relative updates; LAMB adds a "
                "per-layer trust ratio)"
            )
        elif lr is not None:
            rates = (
                f"; LARS would step {phi.name} at {lr * LARS_ETA * rhi:.3g} and {plo.name} at "
                f"{lr * LARS_ETA * rlo:.3g} (lr x {LARS_ETA:g} x ratio)"
            )
        return self.finding(
            Severity.WARNING if severe else Severity.INFO,
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
                own = bool((capture.optimizer or {}).get("own_step"))
                update = None if lr is None else relative_update(p, lr, own)
                if update is not None:
                    row["relative_update"] = update
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
        if finding.kind == "divergence" and ctx.lr and e.get("relative_update"):
            fixes.append(lower_lr_fix(ctx, ctx.lr * 1e-3 / e["relative_update"]))
        if ctx.lr:
            fixes.append(lars_fix(ctx))
        return fixes

    def score(self, finding: Finding) -> float | None:
        e = finding.evidence
        return e.get("spread") or deviation(e.get("relative_update"), 1e-3)

    def label(self, finding: Finding) -> str:
        return finding.message[:60]
