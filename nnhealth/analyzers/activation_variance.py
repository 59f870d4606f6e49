"""NH201 activation-variance."""

from __future__ import annotations

from collections import Counter

from nnhealth.analyzers import _trend
from nnhealth.analyzers._advice import dominant_nonlinearity, init_fix, scoped_layers
from nnhealth.analyzers._fixes import Fix, FixContext, depth_fixes
from nnhealth.analyzers.base import Check, Option, deviation
from nnhealth.capture.stats import ACTIVATION, LAYER, NORM, Capture
from nnhealth.findings import Finding, Severity

TREND_OPTIONS = (
    Option("min_depth", 3, "two layers are a ratio, not a trend"),
    Option(
        "warn_ratio",
        100.0,
        "a 100x change through depth is what PyTorch's default init does to a 5-layer ReLU MLP",
    ),
    Option("error_ratio", 1e4, "at 1e4x the far layers get almost no signal (or overflow)"),
)


# layers whose output scale is not a product of the layers before them: an embedding
# is a lookup (its scale is its init), a recurrent layer has its own gates
RESETTING_KINDS = {
    "Embedding",
    "EmbeddingBag",
    "LSTM",
    "GRU",
    "RNN",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "MultiheadAttention",
}


def depth_points(capture: Capture, role: str, value, reverse: bool = False):
    """(name, value, starts_new_run) for the sites of ``role`` in depth order.

    A normalization layer (or an embedding, a recurrent layer, attention) between two
    sites starts a new run. For nonlinearities only the most common kind is followed
    (an SE block's sigmoid gates are not on the same scale as the ReLU path).
    """
    pts = []
    pending_break = False
    sites = sorted(capture.sites, key=lambda s: s.order)
    kinds = Counter(s.kind for s in sites if s.role == role and s.role == ACTIVATION)
    main_kind = kinds.most_common(1)[0][0] if kinds else None
    for s in sites:
        if s.role == NORM or s.kind in RESETTING_KINDS:
            pending_break = True
        elif s.role == role and (main_kind is None or s.kind == main_kind):
            pts.append((s.name, value(s), pending_break))
            pending_break = False
    if reverse:
        # walk from the output: a break recorded before site i separates i-1 and i
        flags = [p[2] for p in pts]
        pts = [
            (n, v, flags[i + 1] if i + 1 < len(pts) else False) for i, (n, v, _) in enumerate(pts)
        ]
        pts.reverse()
    return pts


def trend_label(finding: Finding) -> str:
    """The per-layer factor of a trend finding."""
    e = finding.evidence
    if "factor_per_layer" in e:
        return f"x{e['factor_per_layer']:.3g}/layer"
    return finding.message[:40]


def trend_severity(trend: _trend.Trend, options: dict) -> Severity:
    return Severity.ERROR if _trend.is_error(trend, options["error_ratio"]) else Severity.WARNING


class ActivationVariance(Check):
    """Activation variance shrinking or growing geometrically with depth.

    What it detects:
        The variance of each nonlinearity's output (each parametric layer's output in a
        network without nonlinearities), in forward order. It fits log-variance against
        depth and reports the per-layer growth factor and the total change over the
        deepest run of layers. Normalization layers (BatchNorm, LayerNorm, GroupNorm,
        RMSNorm) reset the scale, so the trend is fitted only within the runs between
        them: a normalized network is not judged by its raw scale. Embeddings, recurrent
        layers and attention also start a new run, and only the most common nonlinearity
        is followed (gates such as an SE block's sigmoid sit on another scale).

    Why it matters:
        For a layer s = W x, Var(s) = fan_in * Var(w) * Var(x). When fan_in * Var(w)
        is not 1 (after the nonlinearity's own gain), the signal shrinks or grows by that
        factor at every layer: the deep layers see almost nothing (vanishing) or huge
        values (exploding), and the weight gradients, which are proportional to each
        layer's input, go the same way. Severity follows the total change over the
        whole run (first layer to last), not the per-layer factor: a warning from 100x,
        an error from 1e4x (NH202 explains why, with measured stacks). Measured here:
        the classic 5 x 500 tanh stack with W = 0.01 randn, x6.2e-6 (error); 4 GELU
        layers of 256 at PyTorch's default init, x2.4e-3 (a warning: it trains).

    Example:
        The classic 5 x 500 tanh MLP with W = 0.01 * randn: each layer multiplies the
        variance by about 500 * 1e-4 = 0.05, so after five layers it is ~1e-6 of the
        first: "vanishing, x0.05 per layer".

    How to fix:
        Use the initialization that matches the nonlinearity: He (kaiming_normal_) for
        the ReLU family, Xavier (xavier_normal_) for tanh/sigmoid, LeCun for linear or
        SELU; or insert BatchNorm/LayerNorm between layers. The finding's snippet uses
        the nonlinearity the scan saw most.
    """

    code = "NH201"
    name = "activation-variance"
    summary = "per-layer activation variance shrinking or growing geometrically with depth"
    needs = frozenset({"activations"})
    options = TREND_OPTIONS

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        role = ACTIVATION if capture.activation_sites() else LAYER
        pts = depth_points(capture, role, lambda s: s.var)
        trend = _trend.fit(pts)
        verdict = _trend.verdict(trend, options["min_depth"], options["warn_ratio"])
        if verdict == "healthy":
            return []
        what = "nonlinearity outputs" if role == ACTIVATION else "layer outputs"
        if trend.zeros and all(v == 0 for _, v, _ in pts):
            what += " (all of them)"
        last = max(s.order for s in capture.sites if s.name in {n for n, _, _ in pts})
        feeding = [s for s in capture.layer_sites() if s.order < last]
        fix, snippet = init_fix(dominant_nonlinearity(capture), scoped_layers(capture, feeding))
        return [
            self.finding(
                trend_severity(trend, options),
                None,
                f"{verdict}: " + _trend.describe(trend, f"the variance of {what}", "layer"),
                _trend.evidence(trend, verdict),
                fix,
                snippet,
            )
        ]

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        return {}  # the layer table already has each layer's variance (act_var)

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        return depth_fixes(ctx)

    def score(self, finding: Finding) -> float | None:
        return deviation(finding.evidence.get("total_ratio"))

    def label(self, finding: Finding) -> str:
        return trend_label(finding)
