"""NH202 gradient-variance."""

from __future__ import annotations

import itertools
import math

from nnhealth.analyzers import _trend
from nnhealth.analyzers._advice import dominant_nonlinearity, init_fix, scoped_layers, zero_heads
from nnhealth.analyzers._fixes import Fix, FixContext, depth_fixes
from nnhealth.analyzers.activation_variance import (
    RESETTING_KINDS,
    TREND_OPTIONS,
    trend_label,
    trend_severity,
)
from nnhealth.analyzers.base import Check, deviation
from nnhealth.capture.stats import ACTIVATION, LAYER, NORM, Capture, SiteStats
from nnhealth.findings import Finding, Severity


def sensitivity(s: SiteStats, after: SiteStats | None = None) -> float | None:
    """(E_n ||y_n||^2) * (E_n ||g_n||^2) for the site's output y and the loss gradient g
    w.r.t. it, each the mean over the batch of one example's sum of squares.

    Its square root bounds the loss change when the output is perturbed by a fraction
    eps of its own size: |dL| = |g . dy| <= eps ||y|| ||g||, with equality in the
    direction of g. It is the like-with-like quantity across layers: reshaping or
    pooling (AdaptiveAvgPool divides each position's gradient by H*W while the output
    has H*W positions), a layer's output scale, and normalization that divides by it
    all cancel between the two factors. 0 when the gradient is exactly 0; None without
    a gradient or with an output that is exactly 0.

    ``after``, the nonlinearity applied to y next (same shape), gives the output energy
    instead: energy in units the loss cannot see (a ReLU unit pushed far negative by its
    bias, whose gradient is 0) then does not count, and for the ReLU family
    relu(y) . g = y . g exactly, so the bound is tighter and the product stays level
    through a He-initialized ReLU net.
    """
    if s.grad_m2 is None or not s.grad_count or s.grad_mean is None or not s.examples:
        return None
    out = after if after is not None and after.shape == s.shape else s
    act = (out.var + out.mean**2) * out.units * out.per_unit_count / out.examples
    grad = (s.grad_m2 + s.grad_count * s.grad_mean**2) / s.examples
    if grad == 0:
        return 0.0  # no gradient reaches this layer
    value = act * grad
    # an output that is exactly 0 (a zero-initialized head) has no scale to perturb
    return value if math.isfinite(value) and value > 0 else None


def zero_gains(capture: Capture) -> list[str]:
    """Normalization layers whose scale (gamma) is exactly zero: no gradient passes back
    through them."""
    return [
        p.module
        for p in capture.params
        if p.role == "norm" and p.name.endswith("weight") and p.norm == 0.0
    ]


def _parallel(s: SiteStats, group: list[SiteStats]) -> bool:
    """q, k and v of one attention module: named siblings (not the numbered children of
    a Sequential) with outputs of one shape, one after the other."""
    last = group[-1]
    parent, _, leaf = s.module.rpartition(".")
    return (
        not leaf.isdigit()
        and parent == last.module.rpartition(".")[0]
        and s.shape == last.shape
        and s.module != last.module
    )


def block_of(module: str) -> str:
    """The numbered block a module belongs to: its name up to the last index followed by
    a named child ("stages.3.blocks.0" of "stages.3.blocks.0.mlp.fc2"); "" for the
    numbered children of a Sequential ("4") and for modules outside any block."""
    parts = module.split(".")
    cut = [i for i in range(len(parts) - 1) if parts[i].isdigit() and not parts[i + 1].isdigit()]
    return ".".join(parts[: cut[-1] + 1]) if cut else ""


def depth_groups(capture: Capture) -> list[tuple[list[SiteStats], bool]]:
    """The parametric layers with a gradient, in forward order, as (layers computed in
    parallel, starts a new run). A normalization layer, an embedding, a recurrent or
    attention module, a gate (a nonlinearity other than the network's main one: an
    SE block's sigmoid), or the next block of a network whose blocks hold normalization
    layers (residual blocks: the stream between them is not seen) starts a new run; layers with no nonlinearity between them that
    are siblings of one shape (attention's query, key and value) are one point. The
    output layer is left out: its sensitivity is set by the loss at the logits (their
    scale, the number of classes), not by depth."""
    main = dominant_nonlinearity(capture)
    normed = {block_of(s.module) for s in capture.sites if s.role == NORM} - {""}
    groups: list[tuple[list[SiteStats], bool]] = []
    pending, joined, block = False, False, None
    for s in sorted(capture.sites, key=lambda s: s.order):
        here = block_of(s.module)
        pending = pending or (here != block and bool({here, block} & normed))
        block = here
        if s.role == NORM or s.kind in RESETTING_KINDS:
            pending = True
        elif s.role == ACTIVATION:
            pending = pending or (main is not None and s.kind != main)
            joined = False
        elif s.role == LAYER and s.grad_count and not s.is_output:
            if joined and not pending and _parallel(s, groups[-1][0]):
                groups[-1][0].append(s)
            else:
                groups.append(([s], pending))
            pending, joined = False, True
    return groups


def next_activation(capture: Capture) -> dict[str, SiteStats]:
    """Layer site name -> the nonlinearity site that runs right after it, if any."""
    ordered = sorted(capture.sites, key=lambda s: s.order)
    return {
        s.name: nxt
        for s, nxt in itertools.pairwise(ordered)
        if s.role == LAYER and nxt.role == ACTIVATION
    }


def sensitivity_points(
    groups: list[tuple[list[SiteStats], bool]], after: dict[str, SiteStats] | None = None
):
    """(name, sensitivity, starts_new_run) from the output back to the input; a group
    of parallel layers counts with its most sensitive member."""
    after = after or {}
    pts = []
    for sites, new_run in groups:
        valued = [(s.name, sensitivity(s, after.get(s.name))) for s in sites]
        valued = [(n, v) for n, v in valued if v is not None]
        if valued:
            name, value = max(valued, key=lambda nv: nv[1])
            pts.append((name, value, new_run))
    # walk from the output: a break recorded before point i separates i-1 and i
    flags = [p[2] for p in pts] + [False]
    return [(n, v, flags[i + 1]) for i, (n, v, _) in enumerate(pts)][::-1]


class GradientVariance(Check):
    """Gradient signal vanishing or exploding from the output back to the input.

    What it detects:
        At each parametric layer (Linear, Conv, Embedding...) and normalization layer,
        the loss's sensitivity to the layer's output: the batch mean of one example's
        output energy ||y||^2 times the mean of its gradient energy ||dL/dy||^2. Its
        square root is how much the loss moves when that output is perturbed by a
        given fraction of its own size, so it compares like with like across layers:
        unchanged by pooling or reshaping (average pooling over H*W positions divides
        each position's gradient by H*W), by a layer's output scale, and by
        normalization layers, which divide the gradient by what they divide the signal
        by. Walked from the output back to the input, its log is fitted against depth
        (per-layer factor, total change). The fit follows the largest value reached on
        each side of a layer (the main path), so a residual branch that is small by
        design (layer scale, attention logits near 0 at init) is not taken for depth.
        In a positively homogeneous chain (ReLU, linear, tanh near 0) whose every
        layer only shrinks the signal, the sensitivity is the same at every layer:
        that is NH201's finding (the weight gradients are then equally small at every
        layer), not a gradient that vanishes towards the input.

    Why it matters:
        Backpropagation multiplies the gradient by each layer's transposed weights and
        the nonlinearity's derivative. When that loses (or gains) more than the forward
        pass did, e.g. saturated sigmoid/tanh units whose derivative is near 0, the
        loss becomes geometrically less (or more) sensitive to the first layers: they
        stop learning, or get huge updates and diverge.

    Example:
        A 20-layer sigmoid MLP at PyTorch's default init: every layer multiplies the
        gradient by at most 0.25 x the weights' gain, while the sigmoid keeps the
        outputs near 0.5; the sensitivity falls ~x0.02 per layer towards the input:
        "vanishing towards the input".

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
        groups = depth_groups(capture)
        trend = _trend.envelope_fit(sensitivity_points(groups, next_activation(capture)))
        heads = zero_heads(capture)
        if trend is not None and trend.zeros and heads:
            return [self._behind_zero_head(heads[0][0].module, trend)]
        gains = zero_gains(capture)
        if trend is not None and trend.zeros and gains:
            return [self._behind_zero_gain(gains, trend)]
        verdict = _trend.verdict(trend, options["min_depth"], options["warn_ratio"])
        if verdict == "healthy":
            return []
        fix, snippet = init_fix(
            dominant_nonlinearity(capture),
            scoped_layers(capture, [s for g, _ in groups for s in g]),
        )
        if verdict == "exploding":
            fix += "; clip the gradient norm (torch.nn.utils.clip_grad_norm_)"
        what = "the loss's sensitivity to each layer's output (||y||^2 ||dL/dy||^2), from the output back,"
        return [
            self.finding(
                trend_severity(trend, options),
                None,
                f"{verdict} towards the input: " + _trend.describe(trend, what, "layer"),
                _trend.evidence(trend, verdict, "sensitivity"),
                fix,
                snippet,
            )
        ]

    def _behind_zero_gain(self, gains: list[str], trend: _trend.Trend) -> Finding:
        names = ", ".join(gains[:3]) + (" ..." if len(gains) > 3 else "")
        return self.finding(
            Severity.INFO,
            None,
            f"the gradient is exactly 0 at {len(trend.zeros)} layer(s) behind normalization "
            f"layer(s) whose scale is exactly 0 ({names}): nothing flows back through a "
            "zero gain, so gradient flow cannot be judged here; NH103 says whether each "
            "zero is deliberate (a zero-init residual branch) or a fault",
            {"zero_gains": len(gains), "zero_layers": len(trend.zeros)},
            "see NH103 for each zero-gain normalization layer",
        )

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
