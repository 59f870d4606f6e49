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
from nnhealth.analyzers.base import Check, Option, deviation
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


def _walk(capture: Capture) -> list[tuple[list[SiteStats], bool, bool]]:
    """The parametric layers with a gradient, in forward order, as (layers computed in
    parallel, a normalization layer before it, a hard break before it). A hard break is
    an embedding, a recurrent or attention module, a gate (a nonlinearity other than the
    network's main one: an SE block's sigmoid), or the next block of a network whose
    blocks hold normalization layers (residual blocks: the stream between them is not
    seen). Layers with no nonlinearity between them that are siblings of one shape
    (attention's query, key and value) are one point. The output layer is left out: its
    sensitivity is set by the loss at the logits (their scale, the number of classes),
    not by depth."""
    main = dominant_nonlinearity(capture)
    normed = {block_of(s.module) for s in capture.sites if s.role == NORM} - {""}
    groups: list[tuple[list[SiteStats], bool, bool]] = []
    soft, hard, joined, block = False, False, False, None
    for s in sorted(capture.sites, key=lambda s: s.order):
        here = block_of(s.module)
        hard = hard or (here != block and bool({here, block} & normed))
        block = here
        if s.role == NORM:
            soft = True
        elif s.kind in RESETTING_KINDS:
            hard = True
        elif s.role == ACTIVATION:
            hard = hard or (main is not None and s.kind != main)
            joined = False
        elif s.role == LAYER and s.grad_count and not s.is_output:
            if joined and not (soft or hard) and _parallel(s, groups[-1][0]):
                groups[-1][0].append(s)
            else:
                groups.append(([s], soft, hard))
            soft, hard, joined = False, False, True
    return groups


def depth_groups(capture: Capture) -> list[tuple[list[SiteStats], bool]]:
    """The depth points of ``_walk`` as (layers computed in parallel, starts a new run):
    a normalization layer or a hard break starts a new run."""
    return [(sites, soft or hard) for sites, soft, hard in _walk(capture)]


def next_activation(capture: Capture) -> dict[str, SiteStats]:
    """Layer site name -> the nonlinearity site that runs right after it, if any."""
    ordered = sorted(capture.sites, key=lambda s: s.order)
    return {
        s.name: nxt
        for s, nxt in itertools.pairwise(ordered)
        if s.role == LAYER and nxt.role == ACTIVATION
    }


def _most_sensitive(sites: list[SiteStats], after: dict[str, SiteStats]):
    """(site, sensitivity) of the most sensitive of parallel layers, None without one."""
    valued = [(s, sensitivity(s, after.get(s.name))) for s in sites]
    valued = [(s, v) for s, v in valued if v is not None]
    return max(valued, key=lambda sv: sv[1]) if valued else None


def _from_output(pts: list[tuple[str, float, bool]]) -> list[tuple[str, float, bool]]:
    """Forward-order (name, value, break before it) -> from the output back, where a
    break recorded before point i separates i-1 and i."""
    flags = [p[2] for p in pts] + [False]
    return [(n, v, flags[i + 1]) for i, (n, v, _) in enumerate(pts)][::-1]


def sensitivity_points(
    groups: list[tuple[list[SiteStats], bool]], after: dict[str, SiteStats] | None = None
):
    """(name, sensitivity, starts_new_run) from the output back to the input; a group
    of parallel layers counts with its most sensitive member."""
    after = after or {}
    pts = []
    for sites, new_run in groups:
        best = _most_sensitive(sites, after)
        if best is not None:
            pts.append((best[0].name, best[1], new_run))
    return _from_output(pts)


def sequential_link(a: str, b: str) -> bool:
    """Whether modules ``a`` and ``b`` are numbered children of one nn.Sequential (or of
    nested ones: "3.0" and "4.0"): below their common parent both names are indices
    only, so the data flows from one to the next with no residual sum between them."""
    pa, pb = a.split("."), b.split(".")
    common = 0
    while common < min(len(pa), len(pb)) - 1 and pa[common] == pb[common]:
        common += 1
    return all(part.isdigit() for part in pa[common:] + pb[common:])


def _linked(prev: SiteStats | None, site: SiteStats | None, norms: list[SiteStats]) -> bool:
    """Whether ``site`` follows ``prev`` in one nn.Sequential, with the normalization
    layers between them."""
    if prev is None or site is None:
        return False
    between = [n.module for n in norms if prev.order < n.order < site.order]
    return all(sequential_link(prev.module, m) for m in [*between, site.module])


def norm_chains(capture: Capture) -> list[tuple[list[tuple[str, float, bool]], int]]:
    """The plain stacks that only normalization layers cut into runs: (points from the
    output back as (name, sensitivity, starts_new_segment), normalization layers
    crossed). A stack is layers of nn.Sequential containers (``sequential_link``) with
    nothing between them but normalization layers and the main nonlinearity; a hard
    break, a layer outside the container or a gradient of exactly 0 ends it. Within a
    stack a new segment starts where the output shape changes: pooling, striding and
    width change the sensitivity by their own factor (max pooling 2x2 about x4), so
    slopes are taken only between layers of one shape."""
    after = next_activation(capture)
    norms_at = [s for s in capture.sites if s.role == NORM]
    stacks: list[tuple[list[tuple[str, float, bool]], int]] = []
    pts: list[tuple[str, float, bool]] = []
    norms, prev = 0, None
    for sites, soft, hard in _walk(capture):
        best = _most_sensitive(sites, after)
        site = None if best is None or best[1] == 0 else best[0]
        if hard or not _linked(prev, site, norms_at):
            stacks.append((_from_output(pts), norms))
            pts, norms = [], 0
        if site is not None:
            norms += bool(soft and pts)
            pts.append((site.name, best[1], prev is None or site.shape != prev.shape))
        prev = site
    stacks.append((_from_output(pts), norms))
    return [(p, n) for p, n in stacks if n and len(p) >= 2]


def whole_depth(capture: Capture) -> tuple[_trend.Trend, int] | None:
    """The trend of the stack that changes most over its whole depth, across the
    normalization layers in it, with the number it crosses: the per-layer factor is
    fitted within segments of one shape and projected over the whole stack."""
    trends = []
    for pts, norms in norm_chains(capture):
        t = _trend.envelope_fit(pts)
        if t is not None:
            trends.append((_trend.project(t, pts), norms))
    return max(trends, key=lambda tn: abs(math.log(tn[0].total)), default=None)


STACK_FIX = (
    "a plain stack of normalized layers this deep is not trainable at one learning rate "
    "(Yang et al., ICLR 2019: BatchNorm makes gradients grow at every layer at init): "
    "use fewer layers, or add residual connections (x + block(x)), which normalized "
    "networks need at depth; or train with a lower lr and warmup and clip the gradient "
    "norm (torch.nn.utils.clip_grad_norm_)"
)
STACK_SNIPPET = """class Residual(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block  # e.g. nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU())

    def forward(self, x):
        return x + self.block(x)

# in the training loop, before optimizer.step():
torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)"""


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
        A normalization layer starts a new run, so a plain stack of normalized layers
        (children of one nn.Sequential: Linear/Conv, BatchNorm, ReLU, repeated) is also
        fitted over its whole depth, across its norm layers, the per-layer factor taken
        between layers of one shape (pooling and striding have their own factor) and
        projected over the stack: deep BatchNorm stacks make gradients grow at every
        layer at init (Yang et al., ICLR 2019), which no single run shows.

    Why it matters:
        Backpropagation multiplies the gradient by each layer's transposed weights and
        the nonlinearity's derivative. When that loses (or gains) more than the forward
        pass did, e.g. saturated sigmoid/tanh units whose derivative is near 0, the
        loss becomes geometrically less (or more) sensitive to the first layers: they
        stop learning, or get huge updates and diverge.

        Severity follows the total change T over the whole depth (first layer to last),
        not the per-layer factor: one step of layer k lowers the loss by about lr times
        its sensitivity, so at one learning rate one end learns T times faster than the
        other. Measured here (PyTorch default init, width 256, batch 128, 300 steps of
        SGD lr 0.1 or Adam 1e-3 on a teacher task): 4 GELU layers change x0.49 (NH202
        silent; NH201 sees x2.4e-3 in the activations, a warning) and train; 10 GELU
        layers x1.7e-9 and 20 x4e-21 (errors): SGD does not move the loss, Adam barely.
        A 20-layer sigmoid stack x5e-33, tanh with W = randn x1.4e3 over 5 layers
        (warning) and x3e5 over 8 (error). The classic 5 x 500 tanh stack with
        W = 0.01 randn is NH201's x6e-6. A warning from 100x (about what a tuned lr can
        straddle), an error from 1e4x: at a learning rate stable for the fast end the
        slow end needs 1e4 times the steps, and Adam, which equalizes step sizes, leaves
        the fast end 100x sharper (sqrt of T) for the same relative step.
        Normalized stacks have their own thresholds (norm_warn_ratio, norm_error_ratio):
        a layer behind BatchNorm is scale-invariant, and a step too large for it grows
        its weight norm, which lowers its own effective step lr/||w||^2 (Arora et al.,
        ICLR 2019). BatchNorm+ReLU blocks grow x1.46 per block at width 256, batch 128
        (x1.47 = pi/(pi-1) in theory) and x1.43 as 3x3 convs: 16 blocks x3.6e2 train
        slower than 4, 32 blocks x1.7e5 do not train at all; VGG-16-BN (x1.7e3 at
        batch 4, 32x32) is trained at lr 0.01 in torchvision's recipe.

    Example:
        A 20-layer sigmoid MLP at PyTorch's default init: every layer multiplies the
        gradient by at most 0.25 x the weights' gain, while the sigmoid keeps the
        outputs near 0.5; the sensitivity falls ~x0.02 per layer towards the input:
        "vanishing towards the input". A 50-block Linear-BatchNorm-ReLU MLP: x1.46 per
        layer over the whole stack, x1.2e8 in all: "exploding ... through the whole
        stack", while the same depth in residual blocks (x + block(x)) is not flagged.

    How to fix:
        The initialization matching the nonlinearity (He for ReLU, Xavier for tanh and
        sigmoid) keeps the backward factor near 1; normalization layers or residual
        connections keep gradients alive in deep stacks; for exploding gradients, also
        clip the gradient norm (``torch.nn.utils.clip_grad_norm_``). A deep normalized
        stack needs fewer blocks or residual connections; a lower lr with warmup and
        gradient clipping help it start.
    """

    code = "NH202"
    name = "gradient-variance"
    summary = "per-layer gradient variance vanishing or exploding from output to input"
    needs = frozenset({"activations", "gradients"})
    options = (
        *TREND_OPTIONS,
        Option(
            "norm_min_depth",
            6,
            "a per-layer factor projected over a stack needs repeated blocks, not the 2-4 "
            "different layers of one block (ShuffleNet's 3-layer branch: x10.7 per layer)",
        ),
        Option(
            "norm_warn_ratio",
            1e4,
            "VGG-16-BN at init changes x1.7e3 through its 13 convs and trains at the usual "
            "lr: layers behind a norm absorb a step too large by growing their own norm",
        ),
        Option(
            "norm_error_ratio",
            1e5,
            "a 32-block BatchNorm+ReLU MLP (x1.7e5) does not train in 300 steps of SGD or Adam",
        ),
    )

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
            return self._normalized_stack(capture, options)
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

    def _normalized_stack(self, capture: Capture, options: dict) -> list[Finding]:
        """The change over a whole plain stack, across its normalization layers."""
        found = whole_depth(capture)
        if found is None:
            return []
        trend, norms = found
        verdict = _trend.verdict(trend, options["norm_min_depth"], options["norm_warn_ratio"])
        if verdict == "healthy":
            return []
        severity = (
            Severity.ERROR
            if _trend.is_error(trend, options["norm_error_ratio"])
            else Severity.WARNING
        )
        what = (
            f"across {norms} normalization layers and no residual connection, the loss's "
            "sensitivity to each layer's output (||y||^2 ||dL/dy||^2), from the output back,"
        )
        return [
            self.finding(
                severity,
                None,
                f"{verdict} towards the input through the whole stack: "
                + _trend.describe(trend, what, "layer", ends=True),
                {**_trend.evidence(trend, verdict, "sensitivity"), "normalization_layers": norms},
                STACK_FIX,
                STACK_SNIPPET,
                kind="normalized-stack",
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
        # re-initializing or adding norms does not shorten a normalized stack
        return [] if finding.kind == "normalized-stack" else depth_fixes(ctx)

    def score(self, finding: Finding) -> float | None:
        return deviation(finding.evidence.get("total_ratio"))

    def label(self, finding: Finding) -> str:
        return trend_label(finding)
