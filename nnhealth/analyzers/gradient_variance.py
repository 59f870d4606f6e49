"""NH202 gradient-variance."""

from __future__ import annotations

from nnhealth.analyzers import _trend
from nnhealth.analyzers._advice import dominant_nonlinearity, init_fix, zero_heads
from nnhealth.analyzers._fixes import Fix, FixContext, depth_fixes
from nnhealth.analyzers.activation_variance import (
    TREND_OPTIONS,
    depth_points,
    trend_label,
    trend_severity,
)
from nnhealth.analyzers.base import Check, deviation
from nnhealth.capture.stats import ACTIVATION, LAYER, Capture
from nnhealth.findings import Finding, Severity


class GradientVariance(Check):
    """Gradient variance vanishing or exploding from the output back to the input.

    What it detects:
        The variance of the loss gradient with respect to each parametric layer's
        output (Linear, Conv, Embedding...), walked from the output back towards the
        input, as in backpropagation. It fits log-variance against depth and reports the
        per-layer factor and the total change over the deepest run between
        normalization layers (which rescale gradients as well as activations).

    Why it matters:
        Backpropagation multiplies the gradient by each layer's transposed weights and
        the nonlinearity's derivative. If that product's scale is not 1 the gradient
        shrinks or grows geometrically: the first layers get (almost) no update and
        stop learning, or get huge updates and diverge.

    Example:
        The 5 x 500 tanh MLP with W = 0.01 * randn: the gradient w.r.t. each hidden
        layer's output is about 0.05x the one above it; the first layer's is ~1e-6 of
        the last layer's: "vanishing towards the input".

    How to fix:
        The initialization matching the nonlinearity (He for ReLU, Xavier for tanh and
        sigmoid) keeps the backward factor near 1; normalization layers or residual
        connections keep gradients alive in deep stacks; for exploding gradients, also
        clip the gradient norm (``torch.nn.utils.clip_grad_norm_``).
    """

    code = "NH202"
    name = "gradient-variance"
    summary = "per-layer gradient variance vanishing or exploding from output to input"
    needs = frozenset({"activations", "gradients"})
    options = TREND_OPTIONS

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        role = LAYER if capture.layer_sites() else ACTIVATION
        pts = depth_points(capture, role, lambda s: s.grad_var, reverse=True)
        trend = _trend.fit(pts)
        heads = zero_heads(capture)
        if trend is not None and trend.zeros and heads:
            return [self._behind_zero_head(heads[0][0].module, trend)]
        verdict = _trend.verdict(trend, options["min_depth"], options["warn_ratio"])
        if verdict == "healthy":
            return []
        fix, snippet = init_fix(dominant_nonlinearity(capture))
        if verdict == "exploding":
            fix += "; clip the gradient norm (torch.nn.utils.clip_grad_norm_)"
        return [
            self.finding(
                trend_severity(trend, options),
                None,
                f"{verdict} towards the input: "
                + _trend.describe(trend, "the gradient variance, from the output back,", "layer"),
                _trend.evidence(trend, verdict),
                fix,
                snippet,
            )
        ]

    def _behind_zero_head(self, head: str, trend: _trend.Trend) -> Finding:
        return self.finding(
            Severity.INFO,
            None,
            f"the gradient is exactly 0 at {len(trend.zeros)} layer(s) below the zero-"
            f"initialized output layer {head}: nothing flows back through zero weights "
            "until its first update (its own gradient is not zero), so gradient flow "
            "cannot be judged at this step",
            {"output_layer": head, "zero_layers": len(trend.zeros)},
            "nothing to do if the zero init is deliberate; to judge gradient flow, scan "
            "the model after one optimizer step",
        )

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        return {}  # the layer table already has each layer's gradient variance (grad_var)

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        return depth_fixes(ctx)

    def score(self, finding: Finding) -> float | None:
        return deviation(finding.evidence.get("total_ratio"))

    def label(self, finding: Finding) -> str:
        return trend_label(finding)
