"""NH601 init-scale."""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

from nnhealth import nonlinearities
from nnhealth.analyzers._advice import init_fix, py_str, zero_heads
from nnhealth.analyzers._fixes import Fix, FixContext, depth_fixes, reinit_fix
from nnhealth.analyzers.base import Check, Option, deviation, num
from nnhealth.capture.stats import LAYER, NORM, Capture, SiteStats, WeightStats
from nnhealth.findings import Finding, Severity

# the He rule of conv/linear layers before a normalization layer (torchvision's ResNet,
# MobileNet, EfficientNet: kaiming_normal_ with mode="fan_out")
HE_FAN_OUT = nonlinearities.Init(
    "kaiming_normal_", (("mode", "fan_out"), ("nonlinearity", "relu")), label="He (fan_out)"
)
# the GPT-2/BERT/ViT convention: normal(0, 0.02) for every Linear, under LayerNorm
CONVENTION_STD = 0.02
CONVENTION_SPREAD = 0.1  # std within 10% of 0.02: sampling noise of a few hundred weights
CONVENTION_SHARE = 0.9  # "everywhere": 9 layers in 10
# a layer whose measured gradient energy at its output is under this share of the norm's
# is a minor part of the norm's input (a residual branch): not scale-invariant
INVARIANT_SHARE = 0.1
HEAD_DEPTH = 2  # at most this many layers between the last norm and the output: a "head"
# one weight is one draw: a scale the rule itself draws with under 0.1% probability is
# not chance (|w| under 0.00125 of the rule's std; PyTorch's default Linear(1, 1) draws
# |w| = 0.0075 at seed 0)
DRAW_QUANTILE = 1e-3


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


def one_per_unit(w: WeightStats) -> bool:
    """One weight per output unit (Linear(1, n), a 1x1 conv of one input channel per
    group): the variance over units of a single draw each is no scale; E[w^2] is."""
    return math.prod(w.shape) == w.units


def scale(w: WeightStats) -> float:
    """What the rule sets: Var(w), or E[w^2] = ||w||^2 / n with one weight per unit
    (Linear(1, 1): Var(w) is 0 by definition, w^2 is what scales the signal)."""
    return w.var + w.mean**2 if one_per_unit(w) else w.var


@functools.cache
def _draw_band(n: int) -> tuple[float, float]:
    """E[w^2] / Var of n independent normal draws: the 0.1% and 99.9% quantiles of
    chi2(n)/n. One weight drawn by the rule lands anywhere in (1.6e-6, 10.8) x its variance."""
    from scipy.stats import chi2

    return float(chi2.ppf(DRAW_QUANTILE, n) / n), float(chi2.ppf(1 - DRAW_QUANTILE, n) / n)


def ratio(w: WeightStats) -> float | None:
    """The layer's scale over the target (1 inside an unknown-nonlinearity range, and
    with one weight per unit, inside what the rule itself draws 99.8% of the time);
    None: not judged."""
    _, lo, hi = target(w)
    if lo is None:
        return None
    v = scale(w)
    r = v / lo if v < lo else (v / hi if v > hi else 1.0)
    if r != 1.0 and one_per_unit(w):
        band_lo, band_hi = _draw_band(math.prod(w.shape))
        return 1.0 if band_lo <= r <= band_hi else r
    return r


def scale_text(w: WeightStats) -> str:
    """The layer's scale as its message says it: |w| for one weight, rms(w) with one per
    unit, else Var(w); with the rule's expected value for the first two."""
    _, lo, _ = target(w)
    n = math.prod(w.shape)
    if not one_per_unit(w):
        return f"Var(w) = {w.var:.3g}"
    expected = "" if lo is None else f" (the rule's std: {math.sqrt(lo):.3g})"
    if n == 1:
        return f"|w| = {abs(w.mean):.3g}{expected}"
    return f"rms(w) = {math.sqrt(scale(w)):.3g} over its {n} single-weight units{expected}"


def step_factor(w: WeightStats) -> float | None:
    """Effective step of a scale-invariant layer against He init: the He mean square
    (2/fan_in or 2/fan_out, the nearer one; 1 between them) over E[w^2] = ||w||^2 / n.
    With the step lr/||w||^2, that is how much larger the layer's effective step is than
    at He init. None for an all-zero layer (the symmetry check's case)."""
    msq = w.var + w.mean**2
    if msq <= 0:
        return None
    lo, hi = sorted((2.0 / w.fan_in, 2.0 / w.fan_out))
    if msq < lo:
        return lo / msq
    if msq > hi:
        return hi / msq
    return 1.0


def _msq(site: SiteStats) -> float:
    return site.var + site.mean**2


@dataclass
class _Stack:
    """Layers run one after another with no normalization between them."""

    layers: list[WeightStats] = field(default_factory=list)
    renormalized: bool = False  # a normalization layer runs after the stack
    after_norm: bool = False  # its input comes from a normalization layer

    @property
    def total(self) -> float:
        return math.prod(ratio(w) for w in self.layers)


@dataclass
class _Seen:
    """What the pass measured, arranged for this check."""

    stacks: list[_Stack]
    invariant: list[WeightStats]  # layers whose output goes straight into a norm layer
    sites: dict[str, SiteStats]  # each layer's first call
    norm_after: dict[str, SiteStats]  # the norm site fed by each invariant layer
    reference: float | None  # E[x^2] of the network's input, as its first layer saw it


class _Walk:
    """The forward order cut into stacks at every normalization layer (before or after
    a layer: pre-norm and post-norm alike)."""

    def __init__(self, capture: Capture, leave_out: set[str]) -> None:
        self.by_module = {w.module: w for w in capture.weights if w.module not in leave_out}
        self.stacks: list[_Stack] = [_Stack()]
        self.invariant: list[WeightStats] = []
        self.sites: dict[str, SiteStats] = {}
        self.norm_after: dict[str, SiteStats] = {}
        self.waiting: list[WeightStats] = []  # invariant layers before their norm site
        self.seen_norm = False

    def visit(self, site: SiteStats) -> None:
        if site.role == NORM:
            for w in self.waiting:
                self.norm_after[w.module] = site
            self.waiting = []
            self.seen_norm = True
            self.stacks[-1].renormalized = True
            self.stacks.append(_Stack(after_norm=True))
            return
        w = self.by_module.get(site.module)
        if site.role != LAYER or w is None or site.module in self.sites:
            return
        self.sites[site.module] = site
        if w.followed_by == "norm":
            self.invariant.append(w)
            self.waiting.append(w)
            return
        stack = self.stacks[-1]
        stack.after_norm = stack.after_norm if stack.layers else self.seen_norm
        stack.layers.append(w)


def _bias_msq(capture: Capture, module: str) -> float:
    p = next((p for p in capture.params if p.name == f"{module}.bias"), None)
    return 0.0 if p is None or not p.numel else p.norm**2 / p.numel


def _reference(capture: Capture, sites: dict[str, SiteStats]) -> float | None:
    """E[x^2] of the input of the first layer to run, from its output:
    E[y^2] = fan_in E[w^2] E[x^2] + E[b^2] for independent zero-mean weights."""
    first = min(sites.values(), key=lambda s: s.order, default=None)
    if first is None:
        return None
    w = next(w for w in capture.weights if w.module == first.module)
    msq = w.var + w.mean**2
    implied = (_msq(first) - _bias_msq(capture, w.module)) / (w.fan_in * msq) if msq else 0.0
    return implied if implied > 0 else None


def _measured(capture: Capture, leave_out: set[str]) -> _Seen:
    walk = _Walk(capture, leave_out)
    for site in sorted(capture.sites, key=lambda s: s.order):
        walk.visit(site)
    stacks = [s for s in walk.stacks if s.layers]
    return _Seen(
        stacks, walk.invariant, walk.sites, walk.norm_after, _reference(capture, walk.sites)
    )


def _structural(capture: Capture, leave_out: set[str]) -> list[_Stack]:
    """Without a pass: runs of judged layers in key order, ended by a normalization layer."""
    stacks = [_Stack()]
    for w in sorted(capture.weights, key=lambda w: w.order):
        if w.module in leave_out:
            continue
        if ratio(w) is None:  # followed by a norm layer: it absorbs this layer's scale
            stacks[-1].renormalized = True
            stacks.append(_Stack(after_norm=True))
            continue
        stacks[-1].layers.append(w)
    return [s for s in stacks if s.layers]


def _convention(capture: Capture) -> list[WeightStats]:
    """Without a pass: every layer at std 0.02 when nearly every layer is and the model has
    normalization scales (1-D weights): the GPT-2/BERT/ViT convention under LayerNorm."""
    at = [
        w
        for w in capture.weights
        if abs(math.sqrt(w.var + w.mean**2) / CONVENTION_STD - 1) <= CONVENTION_SPREAD
    ]
    norms = any(p.name.rpartition(".")[2] == "weight" and len(p.shape) == 1 for p in capture.params)
    if norms and at and len(at) >= CONVENTION_SHARE * len(capture.weights):
        return at
    return []


def _names(layers: list[WeightStats], most: int = 3) -> str:
    names = [w.module for w in layers]
    shown = ", ".join(names[:most])
    return shown + (f" ... {names[-1]}" if len(names) > most else "")


def _spread(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"x{lo:.2g}" if f"{lo:.2g}" == f"{hi:.2g}" else f"x{lo:.2g}..{hi:.2g}"


def _kinds(layers: list[WeightStats]) -> str:
    kinds = Counter(w.kind for w in layers)
    return "/".join(k for k, _ in kinds.most_common())


def _energy_share(w: WeightStats, seen: _Seen) -> float | None:
    """Gradient energy at the layer's output over that at the norm it feeds,
    Var(y) Var(dL/dy) / (Var(z) Var(dL/dz)): about 1 when the layer's output is the
    norm's whole input (z = N(y) is scale-invariant in y), about the layer's share of the
    norm's input variance when it is one term of a sum (a residual branch)."""
    site, norm = seen.sites.get(w.module), seen.norm_after.get(w.module)
    if site is None or norm is None or not site.grad_var or not norm.grad_var or not norm.var:
        return None
    return site.var * site.grad_var / (norm.var * norm.grad_var)


class InitScale(Check):
    """Weight variance far from the He/Xavier/LeCun target for the layer's fans and
    nonlinearity, judged by the signal the pass measured where the formula does not apply.

    What it detects:
        For each Linear/Conv layer, Var(w) against the variance-preserving target for its
        fan-in/fan-out and the nonlinearity its output goes through (as the pass saw it):
        He 2/fan_in for the ReLU family, Xavier 2/(fan_in+fan_out) for tanh/sigmoid (for
        tanh anything from plain Xavier to Xavier with PyTorch's gain 5/3 passes),
        LeCun 1/fan_in for linear outputs and SELU. Consecutive layers with no
        normalization between them (a stack) multiply their deviations: the expected
        change of the signal's variance is the product of the per-layer ratios.

        Where the formula does not decide, the pass does:

        - a stack whose output goes into a normalization layer (directly, or through a
          residual sum, as in pre-norm transformers: GPT-2, BERT, ViT, ConvNeXt) has its
          scale reset by that layer; a stack that shrinks the signal there is said once,
          as info, for all such layers (std 0.02 linear layers under LayerNorm);
        - a stack that reaches the output is judged when its measured signal agrees: the
          second moment at its end (or, for growth, its largest) against the network
          input's, E[x^2] as the first layer saw it, must be ``layer_ratio`` away in the
          direction the formula predicts (a squeeze-excitation layer with fan-out init
          reads a pooled, small signal: its output stays in range);
        - a head of at most two layers after the last normalization layer that shrinks
          the signal (MobileNet's classifier at std 0.01, GPT-2's lm_head tied to the
          embedding at std 0.02) is info: small logits at init are uniform predictions.

        A layer whose output goes straight into BatchNorm/LayerNorm is scale-invariant:
        its output, and the loss, do not change when its weights are scaled, but its
        effective step is lr/||w||^2 (van Laarhoven 2017; Arora et al. 2019). It is
        judged by that step against He init (the nearer of 2/fan_in and 2/fan_out, the
        family's default): ``step_ratio`` (1000: std 32x below He) warns, and
        ``step_error`` (1e6) or a norm whose measured output variance fell below half of
        its gain squared (its eps now dominates the tiny input: the scale no longer
        cancels) is an error. Too large weights are the mirror case: an effective step
        1/``step_ratio`` of He's. Whether the output really is the norm's whole input is
        measured from the gradients (a residual branch summed with a larger stream is
        not scale-invariant and is left alone).

        A layer with one weight per output unit (Linear(1, 1), Linear(1, n)) has no
        variance to speak of (Var(w) of one number is 0): it is judged by E[w^2] (|w|^2
        for one weight) against the rule's variance, and with so few draws only outside
        what the rule itself draws 99.8% of the time (chi2(n)/n: for one weight, |w| under
        0.00125 or over 3.3 x the rule's std).

        An output layer whose weights are all exactly zero while its gradient is not
        (torchvision's ViT head) is info. From a bare state_dict there is no pass: the
        formula decides, against the LeCun..He range (nonlinearity unknown); std 0.02 in
        nearly every layer of a model with normalization scales is the GPT/BERT/ViT
        convention and is info.

    Why it matters:
        Var(s) = fan_in * Var(w) * Var(x) per layer, so a ratio r away from the target
        scales the signal by about r per layer, forward and backward: r^depth through a
        stack. PyTorch's default nn.Linear init has Var(w) = 1/(3 fan_in), a sixth of
        He's: harmless in two layers (x0.03), a 1e-4 shrink through five ReLU layers.
        Behind a normalization layer the signal is safe but the step is not: conv weights
        x0.01 of He before BatchNorm take steps 1e4x larger than the learning rate says.

    Example:
        A 10-layer ReLU MLP with Xavier-scale weights (Var = 1/fan_in, half of He):
        "10 layers at x0.5 of the He target: expected variance change x0.001 through
        depth". A ResNet whose convs were multiplied by 0.01: "20 Conv2d layers before a
        normalization layer have E[w^2] at x1e-4 of He: effective step x1e4".

    How to fix:
        Re-initialize with the rule for the nonlinearity (kaiming_normal_ for ReLU,
        xavier_normal_ with the tanh/sigmoid gain, LeCun for linear/SELU), or put a
        normalization layer after each layer. Re-initialize layers before a norm with He
        (kaiming_normal_, mode="fan_out", as torchvision does).
    """

    code = "NH601"
    name = "init-scale"
    summary = "weight variance far from the He/Xavier/LeCun target for the layer"
    needs = frozenset({"weights"})
    uses = frozenset({"activations", "gradients"})  # the measured signal; zero heads
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
        Option(
            "step_ratio",
            1000.0,
            "std 32x below He before a norm: every step 1000x the learning rate's; std 0.01 "
            "(VGG, detection heads) stays within it from fan_in 20, std 0.02 from fan_in 5",
        ),
        Option(
            "step_error",
            1e6,
            "std 1000x below He: the first steps overwrite the weights' direction entirely",
        ),
    )

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        heads = zero_heads(capture)
        out = [self._head_finding(w, grad_norm) for w, grad_norm in heads]
        leave_out = {w.module for w, _ in heads}
        if capture.has_activations and capture.sites:
            seen = _measured(capture, leave_out)
            out += self._invariance_findings(capture, seen, options)
            stacks = seen.stacks
        else:
            seen = None
            convention = _convention(capture)
            if convention:
                out.append(self._convention_finding(convention, len(capture.weights)))
            leave_out |= {w.module for w in convention}
            stacks = _structural(capture, leave_out)
        absorbed, heads_small, judged = _sort_stacks(stacks, seen is not None, options)
        if absorbed:
            out.append(self._absorbed_finding(absorbed))
        if heads_small:
            out.append(self._small_head_finding(heads_small))
        out += self._formula_findings(judged, seen, options)
        return out

    # ---- stacks judged by the formula (confirmed by the measured signal) ----------------
    def _formula_findings(self, stacks: list[_Stack], seen: _Seen | None, options: dict):
        out, single = [], []
        for stack in stacks:
            total = stack.total
            flagged = total <= 1 / options["warn_ratio"] or total >= options["warn_ratio"]
            if flagged and len(stack.layers) > 1:
                measured = _confirmed(stack.layers, total < 1, seen, options)
                if measured is not False:
                    out.append(self._stack_finding(stack.layers, total, measured, options))
                continue
            for w in stack.layers:
                r = ratio(w)
                off = r <= 1 / options["layer_ratio"] or r >= options["layer_ratio"]
                if off and _confirmed([w], r < 1, seen, options) is not False:
                    single.append(w)
        for group in _by_direction(single):
            out.append(self._layer_finding(group))
        return out

    def _stack_finding(
        self, stack: list[WeightStats], total: float, measured: float | None, options: dict
    ) -> Finding:
        ratios = [ratio(w) for w in stack]
        geo = 0.0 if 0 in ratios else math.exp(sum(map(math.log, ratios)) / len(ratios))
        worst = max(stack, key=lambda w: math.inf if ratio(w) == 0 else abs(math.log(ratio(w))))
        kinds = Counter(w.followed_by for w in stack if w.followed_by not in (None, "none"))
        nonlinearity = kinds.most_common(1)[0][0] if kinds else None
        severity = (
            Severity.ERROR
            if total <= 1 / options["error_ratio"] or total >= options["error_ratio"]
            else Severity.WARNING
        )
        fix, snippet = init_fix(nonlinearity)
        message = _stack_message(stack, worst, geo, total, measured)
        # the layer to look at: the first with no variance at all, else where the stack starts
        zero = next((w for w in stack if ratio(w) == 0), None)
        evidence = {
            "first_layer": stack[0].module,
            "last_layer": stack[-1].module,
            "layers": len(stack),
            "mean_ratio": geo,
            "expected_change": total,
            "worst_layer": worst.module,
            "worst_ratio": ratio(worst),
            "worst_var": worst.var,
            "worst_target": target(worst)[1],
        }
        if measured is not None:
            evidence["measured_change"] = measured
        if one_per_unit(worst):
            evidence["worst_rms_w"] = math.sqrt(scale(worst))
        at = zero or (worst if one_per_unit(worst) else stack[0])  # a single weight: itself
        return self.finding(severity, at.module, message, evidence, fix, snippet)

    def _layer_finding(self, group: list[WeightStats]) -> Finding:
        w = max(group, key=lambda w: abs(math.log(ratio(w))))
        rule, lo, _ = target(w)
        r = ratio(w)
        nonlinearity = w.followed_by if w.followed_by not in (None, "none") else None
        fix, snippet = init_fix(nonlinearity, [v.module for v in group])
        evidence = {
            "var": w.var,
            "target": lo,
            "ratio": r,
            "fan_in": w.fan_in,
            "fan_out": w.fan_out,
        }
        if one_per_unit(w):
            evidence["rms_w"] = math.sqrt(scale(w))
        if len(group) == 1:
            message = (
                f"{scale_text(w)} is x{r:.3g} of {rule} for fan_in {w.fan_in}, fan_out {w.fan_out}"
            )
        else:
            ratios = [ratio(v) for v in group]
            measure = "their weight scale" if any(map(one_per_unit, group)) else "Var(w)"
            message = (
                f"{len(group)} {_kinds(group)} layers have {measure} at {_spread(ratios)} of "
                f"their target ({_names(group)}; worst {w.module}: {scale_text(w)}, x{r:.3g} "
                f"of {rule})"
            )
            evidence |= {"layers": len(group), "first_layer": group[0].module}
            evidence |= {"last_layer": group[-1].module}
        return self.finding(Severity.WARNING, w.module, message, evidence, fix, snippet)

    # ---- info: where the formula does not apply ----------------------------------------
    def _absorbed_finding(self, layers: list[WeightStats]) -> Finding:
        ratios = [ratio(w) for w in layers]
        stds = [math.sqrt(w.var + w.mean**2) for w in layers]
        return self.finding(
            Severity.INFO,
            layers[0].module,
            f"{len(layers)} {_kinds(layers)} layers have Var(w) at {_spread(ratios)} of the "
            f"fan-in rule (std {num(min(stds))}..{num(max(stds))}; {_names(layers)}), and a "
            "normalization layer after them (directly or through a residual sum) resets the "
            "signal's scale: the design of pre-norm transformers (GPT-2, BERT, ViT: std 0.02 "
            "under LayerNorm) and normalized CNNs, which train as they are",
            {
                "layers": len(layers),
                "min_ratio": min(ratios),
                "max_ratio": max(ratios),
                "min_std": min(stds),
                "max_std": max(stds),
            },
            "nothing to do: the normalization after these layers absorbs their scale",
        )

    def _small_head_finding(self, layers: list[WeightStats]) -> Finding:
        ratios = [ratio(w) for w in layers]
        total = math.prod(ratios)
        return self.finding(
            Severity.INFO,
            layers[0].module,
            f"the output head after the last normalization layer ({_names(layers)}) has "
            f"Var(w) at {_spread(ratios)} of its target: the logits start x{total:.3g} in "
            "variance, near-uniform predictions (MobileNet's classifier at std 0.01, a tied "
            "lm_head at std 0.02), which training scales up in its first steps",
            {"layers": len(layers), "expected_change": total, "min_ratio": min(ratios)},
            "nothing to do if the small head is deliberate; otherwise initialize it with "
            "LeCun init (Var(w) = 1/fan_in)",
        )

    def _convention_finding(self, layers: list[WeightStats], total: int) -> Finding:
        ratios = [r for r in map(ratio, layers) if r is not None] or [1.0]
        return self.finding(
            Severity.INFO,
            layers[0].module,
            f"{len(layers)} of {total} layers use std {CONVENTION_STD} ({_spread(ratios)} of "
            f"the LeCun..He range; {_names(layers)}): the GPT-2/BERT/ViT convention under "
            "LayerNorm, judged by the measured signal when the model runs (give an "
            "architecture to check it)",
            {"layers": len(layers), "min_ratio": min(ratios), "max_ratio": max(ratios)},
            "nothing to do for a pre-norm transformer; scan the model with a batch to measure it",
        )

    # ---- scale invariance behind a normalization layer --------------------------------
    def _invariance_findings(self, capture: Capture, seen: _Seen, options: dict):
        small, large = [], []
        for w in seen.invariant:
            factor = step_factor(w)
            share = _energy_share(w, seen)
            if factor is None or (share is not None and share < INVARIANT_SHARE):
                continue  # all zero (symmetry), or one term of a residual sum
            if factor >= options["step_ratio"]:
                small.append(w)
            elif factor <= 1 / options["step_ratio"]:
                large.append(w)
        return [self._step_finding(g, capture, seen, options) for g in (small, large) if g]

    def _step_finding(
        self, group: list[WeightStats], capture: Capture, seen: _Seen, options: dict
    ) -> Finding:
        factors = [step_factor(w) for w in group]
        lo, hi = min(factors), max(factors)
        kept = _norm_kept(group, capture, seen)
        small = lo > 1
        error = small and (hi >= options["step_error"] or (kept is not None and kept < 0.5))
        msq_ratio = [1 / f for f in factors]
        worst = group[factors.index(hi if small else lo)]
        if small:
            effect = (
                f"effective step x{_spread(factors)[1:]} of He init's (lr/||w||^2, the layers "
                "are scale-invariant behind the norm): the first steps overwrite their direction"
            )
        else:
            effect = (
                f"effective step x{_spread(factors)[1:]} of He init's (lr/||w||^2): they "
                "barely learn"
            )
        if kept is not None and kept < 0.5:
            effect += (
                f"; the norm layers' eps dominates their tiny input: their measured output "
                f"variance is down to x{kept:.3g} of gain^2"
            )
        message = (
            f"{len(group)} {_kinds(group)} layers before a normalization layer have E[w^2] at "
            f"{_spread(msq_ratio)} of He ({_names(group)}): {effect}"
        )
        evidence = {
            "layers": len(group),
            "first_layer": group[0].module,
            "last_layer": group[-1].module,
            "min_step_factor": lo,
            "max_step_factor": hi,
            "worst_layer": worst.module,
            "worst_var": worst.var,
        }
        if kept is not None:
            evidence["norm_output_ratio"] = kept
        scoped = ", ".join(f"model.get_submodule({py_str(w.module)})" for w in group)
        snippet = (
            f"for m in [{scoped}]:\n"
            f"    {HE_FAN_OUT.snippet('m.weight')}\n"
            "    if m.bias is not None:\n"
            "        nn.init.zeros_(m.bias)"
        )
        fix = (
            're-initialize these layers with He init (kaiming_normal_, mode="fan_out", as '
            "torchvision does before BatchNorm); the normalization after them keeps the signal, "
            "the init sets the step"
        )
        severity = Severity.ERROR if error else Severity.WARNING
        return self.finding(severity, worst.module, message, evidence, fix, snippet, "step")

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
            if w.followed_by == "norm":
                rows[w.module]["init_step_factor"] = step_factor(w)
        return rows

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        e = finding.evidence
        if finding.kind != "step":
            return depth_fixes(ctx)
        lo, hi = e["min_step_factor"], e["max_step_factor"]
        names = [
            r["name"]
            for r in ctx.rows
            if r.get("init_step_factor") is not None
            and lo * (1 - 1e-9) <= r["init_step_factor"] <= hi * (1 + 1e-9)
        ]

        def apply(model) -> str | None:
            for name in names:
                reinit_fix("", name, HE_FAN_OUT).apply(model)
            return None if names else "no layer left to re-initialize"

        label = f"{HE_FAN_OUT.name} on {len(names)} layers before a norm ({_short(names)})"
        return [Fix(label, apply)]

    def score(self, finding: Finding) -> float | None:
        e = finding.evidence
        if "max_step_factor" in e:
            return max(deviation(e["max_step_factor"]), deviation(e["min_step_factor"]))
        return deviation(e.get("expected_change") or e.get("ratio"))

    def label(self, finding: Finding) -> str:
        e = finding.evidence
        if "max_step_factor" in e:
            return f"step x{e['max_step_factor']:.3g}"
        if "expected_change" in e:
            return f"x{e['expected_change']:.3g} through depth"
        return f"x{e.get('ratio', 0):.3g}"


def _stack_message(
    stack: list[WeightStats], worst: WeightStats, geo: float, total: float, measured: float | None
) -> str:
    """A stack finding's message: its layers with no signal, or its expected change."""
    rule = target(worst)[0]
    if total == 0:
        zeros = [w for w in stack if ratio(w) == 0]
        names = ", ".join(w.module for w in zeros[:4]) + (" ..." if len(zeros) > 4 else "")
        what = "Var(w) is exactly 0"
        if all(map(one_per_unit, zeros)):  # a variance of single draws says nothing
            what = f"{scale_text(zeros[0])}: every weight is exactly 0"
        return (
            f"{what} in {len(zeros)} of {len(stack)} layers ({names}; target {rule}): no "
            "signal passes them"
        )
    measure = "their weight scale" if any(map(one_per_unit, stack)) else "Var(w)"
    shown = f"{scale_text(worst)}, " if one_per_unit(worst) else ""
    direction = "shrink" if total < 1 else "growth"
    seen = "" if measured is None else f" (measured: x{measured:.2g} of the input's)"
    return (
        f"{len(stack)} layers from {stack[0].module} to {stack[-1].module} have {measure} "
        f"at x{geo:.3g} of their target on average (worst {worst.module}: {shown}"
        f"x{ratio(worst):.3g} of {rule}): expected variance {direction} x{total:.3g} "
        f"through depth{seen}"
    )


def _short(names: list[str]) -> str:
    return ", ".join(names[:2]) + (f" ... {names[-1]}" if len(names) > 2 else "")


def _off(stack: _Stack, options: dict) -> list[WeightStats]:
    """The layers of a shrinking stack the formula would report: all of them when the
    stack's product is ``warn_ratio`` off, else those ``layer_ratio`` off."""
    if stack.total <= 1 / options["warn_ratio"] and len(stack.layers) > 1:
        return stack.layers
    return [w for w in stack.layers if ratio(w) <= 1 / options["layer_ratio"]]


def _sort_stacks(stacks: list[_Stack], measured: bool, options: dict):
    """(layers whose shrink a norm after them absorbs, small output heads, stacks the
    formula judges). Only with a pass: without one, whether a norm follows is a guess."""
    absorbed: list[WeightStats] = []
    heads: list[WeightStats] = []
    judged: list[_Stack] = []
    for stack in stacks:
        shrink = stack.total < 1
        if measured and shrink and stack.renormalized:
            absorbed += _off(stack, options)
        elif measured and shrink and stack.after_norm and len(stack.layers) <= HEAD_DEPTH:
            heads += stack.layers if _off(stack, options) else []
        else:
            judged.append(stack)
    return absorbed, heads, judged


def _confirmed(
    layers: list[WeightStats], shrink: bool, seen: _Seen | None, options: dict
) -> float | bool | None:
    """The measured change of the signal's second moment (the stack's end for a shrink,
    its largest for a growth) over the network input's, when it confirms the formula;
    False when it contradicts it (within ``layer_ratio`` of the input's); None when
    nothing was measured."""
    if seen is None or seen.reference is None:
        return None
    values = [_msq(seen.sites[w.module]) for w in layers if w.module in seen.sites]
    if not values:
        return None
    change = (values[-1] if shrink else max(values)) / seen.reference
    bound = options["layer_ratio"]
    ok = change <= 1 / bound if shrink else change >= bound
    return change if ok else False


def _by_direction(layers: list[WeightStats]) -> list[list[WeightStats]]:
    down = [w for w in layers if ratio(w) < 1]
    up = [w for w in layers if ratio(w) > 1]
    return [g for g in (down, up) if g]


def _norm_kept(group: list[WeightStats], capture: Capture, seen: _Seen) -> float | None:
    """The smallest measured output variance of the norm layers after ``group``, over
    their gain squared (about 1 while the norm's eps is negligible)."""
    kept = []
    for w in group:
        norm = seen.norm_after.get(w.module)
        if norm is None:
            continue
        gain = next((p for p in capture.params if p.name == f"{norm.module}.weight"), None)
        g2 = 1.0 if gain is None or not gain.numel else gain.norm**2 / gain.numel
        if g2 > 0:
            kept.append(norm.var / g2)
    return min(kept) if kept else None
