"""NH601 init-scale."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

from nnhealth import nonlinearities
from nnhealth.analyzers._advice import init_fix, py_str, zero_heads
from nnhealth.analyzers._fixes import Fix, FixContext, depth_fixes
from nnhealth.analyzers.base import Check, Option, deviation
from nnhealth.capture.stats import Capture, WeightStats
from nnhealth.findings import Finding, Severity


def target(w: WeightStats) -> tuple[str, float | None, float | None]:
    """(rule, low, high): the variance the layer's init should have, as a range.

    A single rule gives low == high; an unknown nonlinearity gives the LeCun..He range.
    """
    nl = w.followed_by
    if nl == "norm":
        return "not judged: followed by a normalization layer, which absorbs the scale", None, None
    if nl is None:
        return "LeCun..He (nonlinearity unknown)", 1.0 / w.fan_in, 2.0 / w.fan_in
    entry = nonlinearities.lookup(nl)
    family = None if entry is None else entry.family
    if family == nonlinearities.RELU:
        return f"He 2/fan_in ({nl})", 2.0 / w.fan_in, 2.0 / w.fan_in
    if family == nonlinearities.SIGMOID:
        v = 2.0 / (w.fan_in + w.fan_out)
        if entry.gain != 1.0:  # plain Xavier, up to PyTorch's gain (tanh: 5/3, squared)
            gain = Fraction(entry.gain).limit_denominator(100)
            return f"Xavier 2/(fan_in+fan_out), gain 1..{gain} ({nl})", v, v * entry.gain**2
        return f"Xavier 2/(fan_in+fan_out) ({nl})", v, v
    label = "linear" if nl == "none" else nl
    return f"LeCun 1/fan_in ({label})", 1.0 / w.fan_in, 1.0 / w.fan_in


def ratio(w: WeightStats) -> float | None:
    """Var(w) over the target (1 inside an unknown-nonlinearity range); None: not judged."""
    _, lo, hi = target(w)
    if lo is None:
        return None
    if w.var < lo:
        return w.var / lo
    if w.var > hi:
        return w.var / hi
    return 1.0


class InitScale(Check):
    """Weight variance far from the He/Xavier/LeCun target for the layer's fans and
    nonlinearity.

    What it detects:
        For each Linear/Conv layer, Var(w) against the variance-preserving target for its
        fan-in/fan-out and the nonlinearity its output goes through (as the pass saw it):
        He 2/fan_in for the ReLU family, Xavier 2/(fan_in+fan_out) for tanh/sigmoid (for
        tanh anything from plain Xavier to Xavier with PyTorch's gain 5/3 passes),
        LeCun 1/fan_in for linear outputs and SELU. From a bare state_dict the
        nonlinearity is unknown: the layer is judged against the LeCun..He range, and
        the report says so. Consecutive layers multiply their deviation: the expected
        change of the signal's variance through a stack is the product of the per-layer
        ratios ([n Var(w)]^depth for equal layers). A layer followed by BatchNorm/
        LayerNorm is not judged (the norm layer absorbs the scale) and ends a stack. An
        output layer whose weights are all exactly zero while its gradient is not
        (torchvision's ViT head, zero-initialized on purpose) is reported as info and
        left out of its stack: it learns from the first step.

    Why it matters:
        Var(s) = fan_in * Var(w) * Var(x) per layer, so a ratio r away from the target
        scales the signal by about r per layer, forward and backward: r^depth through a
        stack. PyTorch's default nn.Linear init has Var(w) = 1/(3 fan_in), a sixth of
        He's: harmless in two layers (x0.03), a 1e-4 shrink through five ReLU layers.

    Example:
        A 10-layer ReLU MLP with Xavier-scale weights (Var = 1/fan_in, half of He):
        "10 layers at x0.5 of the He target: expected variance change x0.001 through
        depth".

    How to fix:
        Re-initialize with the rule for the nonlinearity (kaiming_normal_ for ReLU,
        xavier_normal_ with the tanh/sigmoid gain, LeCun for linear/SELU), or put a
        normalization layer after each layer.
    """

    code = "NH601"
    name = "init-scale"
    summary = "weight variance far from the He/Xavier/LeCun target for the layer"
    needs = frozenset({"weights"})
    uses = frozenset({"activations", "gradients"})  # gradients: is a zero head moving
    options = (
        Option(
            "warn_ratio",
            100.0,
            "a 100x expected change through a stack is what default init does to 5 ReLU layers",
        ),
        Option("error_ratio", 1e4, "at 1e4x the far layers get almost no signal (or overflow)"),
        Option(
            "layer_ratio",
            10.0,
            "one layer 10x off its target distorts the signal even in a shallow network",
        ),
    )

    def _stacks(self, capture: Capture, leave_out: list[WeightStats]) -> list[list[WeightStats]]:
        """Runs of judged layers in depth order, ended by a normalization layer."""
        stacks: list[list[WeightStats]] = [[]]
        for w in sorted(capture.weights, key=lambda w: w.order):
            if w in leave_out:
                continue
            r = ratio(w)
            if r is None:  # followed by a norm layer: it absorbs this layer's scale
                stacks.append([])
                continue
            stacks[-1].append(w)
        return [s for s in stacks if s]

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        heads = zero_heads(capture)
        out = [self._head_finding(w, grad_norm) for w, grad_norm in heads]
        for stack in self._stacks(capture, [w for w, _ in heads]):
            total = math.prod(ratio(w) for w in stack)
            flagged = total <= 1 / options["warn_ratio"] or total >= options["warn_ratio"]
            if flagged and len(stack) > 1:
                out.append(self._stack_finding(stack, total, options))
                continue
            for w in stack:
                r = ratio(w)
                if r <= 1 / options["layer_ratio"] or r >= options["layer_ratio"]:
                    out.append(self._layer_finding(w, r, options))
        return out

    def _stack_finding(self, stack: list[WeightStats], total: float, options: dict) -> Finding:
        ratios = [ratio(w) for w in stack]
        geo = 0.0 if 0 in ratios else math.exp(sum(map(math.log, ratios)) / len(ratios))
        worst = max(stack, key=lambda w: math.inf if ratio(w) == 0 else abs(math.log(ratio(w))))
        rule = target(worst)[0]
        kinds = Counter(w.followed_by for w in stack if w.followed_by not in (None, "none"))
        nonlinearity = kinds.most_common(1)[0][0] if kinds else None
        severity = (
            Severity.ERROR
            if total <= 1 / options["error_ratio"] or total >= options["error_ratio"]
            else Severity.WARNING
        )
        direction = "shrink" if total < 1 else "growth"
        fix, snippet = init_fix(nonlinearity)
        if total == 0:
            zeros = [w.module for w in stack if ratio(w) == 0]
            message = (
                f"Var(w) is exactly 0 in {len(zeros)} of {len(stack)} layers ({', '.join(zeros[:4])}"
                f"{' ...' if len(zeros) > 4 else ''}; target {rule}): no signal passes them"
            )
        else:
            message = (
                f"{len(stack)} layers from {stack[0].module} to {stack[-1].module} have Var(w) at "
                f"x{geo:.3g} of their target on average (worst {worst.module}: "
                f"x{ratio(worst):.3g} of {rule}): expected variance {direction} x{total:.3g} "
                "through depth"
            )
        # the layer to look at: the first with no variance at all, else where the stack starts
        zero = next((w for w in stack if ratio(w) == 0), None)
        return self.finding(
            severity,
            (zero or stack[0]).module,
            message,
            {
                "first_layer": stack[0].module,
                "last_layer": stack[-1].module,
                "layers": len(stack),
                "mean_ratio": geo,
                "expected_change": total,
                "worst_layer": worst.module,
                "worst_ratio": ratio(worst),
                "worst_var": worst.var,
                "worst_target": target(worst)[1],
            },
            fix,
            snippet,
        )

    def _head_finding(self, w: WeightStats, grad_norm: float | None) -> Finding:
        moving = "is not zero" if grad_norm else "is not known (no gradients were computed)"
        return self.finding(
            Severity.INFO,
            w.module,
            f"the output layer's weights are all zero (zero-initialized on purpose, as "
            f"torchvision's ViT head is): its gradient {moving}, so it learns from the first "
            "step; until then the model's output and the gradient to earlier layers are zero",
            {"var": w.var, "ratio": 0.0, "grad_norm": grad_norm, "fan_in": w.fan_in},
            "nothing to do if the zero init is deliberate; otherwise initialize the output "
            "layer with LeCun init (Var(w) = 1/fan_in)",
        )

    def _layer_finding(self, w: WeightStats, r: float, options: dict) -> Finding:
        rule, lo, _ = target(w)
        fix, snippet = init_fix(w.followed_by if w.followed_by not in (None, "none") else None)
        return self.finding(
            Severity.WARNING,
            w.module,
            f"Var(w) = {w.var:.3g} is x{r:.3g} of {rule} for fan_in {w.fan_in}, fan_out "
            f"{w.fan_out}",
            {"var": w.var, "target": lo, "ratio": r, "fan_in": w.fan_in, "fan_out": w.fan_out},
            fix,
            snippet.replace(
                "for m in model.modules():",
                "for m in [model.get_submodule(" + py_str(w.module) + ")]:",
            ),
        )

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        rows = {}
        for w in capture.weights:
            rule, lo, _ = target(w)
            rows[w.module] = {
                "init_var": w.var,
                "init_target": lo,
                "init_ratio": ratio(w),
                "init_rule": rule,
                "fan_in": w.fan_in,
                "fan_out": w.fan_out,
            }
        return rows

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        return depth_fixes(ctx)

    def score(self, finding: Finding) -> float | None:
        e = finding.evidence
        return deviation(e.get("expected_change") or e.get("ratio"))

    def label(self, finding: Finding) -> str:
        e = finding.evidence
        if "expected_change" in e:
            return f"x{e['expected_change']:.3g} through depth"
        return f"x{e.get('ratio', 0):.3g}"
