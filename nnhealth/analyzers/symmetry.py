"""NH501 symmetry."""

from __future__ import annotations

import math

import numpy as np

from nnhealth.analyzers._advice import py_str
from nnhealth.analyzers._fixes import Fix, FixContext, noise_fix, reinit_fix
from nnhealth.analyzers.base import Check, Option
from nnhealth.analyzers.dead_relu import preceding_layer
from nnhealth.capture.groups import near_duplicate_groups
from nnhealth.capture.stats import LAYER, NORM, Capture, SiteStats, WeightStats
from nnhealth.findings import Finding, Severity
from nnhealth.nonlinearities import init_rule
from nnhealth.plan import Request

_REINIT = (
    "layer = model.get_submodule({name})\n"
    "nn.init.kaiming_normal_(layer.weight)  # any random init breaks the tie\n"
    "if layer.bias is not None:\n"
    "    nn.init.zeros_(layer.bias)"
)
_NOISE = (
    "layer = model.get_submodule({name})\n"
    "with torch.no_grad():  # keep the copied function, break the tie\n"
    "    layer.weight.add_(1e-3 * layer.weight.std() * torch.randn_like(layer.weight))"
)


def _pairs(groups) -> int:
    return sum(len(g) * (len(g) - 1) // 2 for g in groups)


def chance_probability(pairs: int, expected: float) -> float:
    """P(at least ``pairs`` equal pairs) when chance alone gives ``expected`` on average
    (Poisson): how well chance explains what was found."""
    if pairs <= 0:
        return 1.0
    if not expected > 0:
        return 0.0
    from scipy.special import pdtrc

    return float(pdtrc(pairs - 1, expected))


def weight_groups(w: WeightStats, options: dict) -> tuple[tuple[int, ...], ...]:
    """The layer's groups of equal units, or none when chance explains them: a layer
    stored in float8 (or bfloat16) with only a few inputs per unit has few distinct rows,
    so random units land on equal ones."""
    if not w.groups or chance_probability(_pairs(w.groups), w.chance_pairs) >= options["chance"]:
        return ()
    return w.groups


def _describe(groups: list, units: int) -> tuple[int, int, int]:
    grouped = sum(len(g) for g in groups)
    duplicated = sum(len(g) - 1 for g in groups)
    return grouped, duplicated, units - duplicated


class Symmetry(Check):
    """Units of one layer that can never become different.

    What it detects:
        Units of a layer (rows of a Linear weight, filters of a convolution, each with its
        bias) that are identical, exactly or within ``rtol`` relative to their norm, and
        reports them as groups with the layer's effective width. Found in linear time
        (one sort by a random projection), so it runs on 16k-wide layers. When a batch
        was run, it also compares each nonlinearity's units by their outputs over the
        batch: units whose incoming weights differ but whose outputs are identical (the
        difference sits on inputs that are always zero, or symmetry created upstream).
        Not findings: the output layer (each output gets its own gradient from the loss),
        a layer of one unit, a frozen layer, and constant units (dead or saturated, which
        NH101/NH102 report).
        Precision: bfloat16 keeps 8 significant bits and float8 e4m3 4, so values that
        differ in float32 often round to the same one. Rows of a few hundred random
        inputs still never coincide, but a float8 layer with two or three inputs per unit
        has few distinct rows, and two ReLU units that fire on one example of a small
        batch agree in bfloat16 on that one value about 1 time in 300. Equal units are
        reported only when chance coincidences (a random init at the layer's own scale,
        stored in its dtype; for outputs, the values that can tell units apart at the
        outputs' precision) would explain them with probability below ``chance``.

    Why it matters:
        Units with identical incoming weights compute the same activation and receive
        the same gradient, so they stay identical forever: a layer of 500 such units has
        the capacity of one. Any constant initialization (zero included) does this to a
        whole layer; copying units (net2net-style widening) without noise does it to a
        few.

    Example:
        A zero-initialized MLP: "128 units form 1 group: effective width 1 of 128".

    How to fix:
        Initialize weights randomly (He/Xavier): random init breaks the symmetry with
        probability one. For deliberately copied units, add a little noise to the copies.
    """

    code = "NH501"
    name = "symmetry"
    summary = "units in a layer with identical incoming weights (or identical activations)"
    needs = frozenset({"weights"})
    uses = frozenset({"activations"})
    options = (
        Option("rtol", 1e-6, "copies stay within float32 rounding; random rows are ~1 apart"),
        Option(
            "activation_rtol",
            1e-6,
            "identical units give identical projections up to float32 rounding; units that "
            "differ on a single example differ by far more",
        ),
        Option("error_fraction", 0.5, "half a layer duplicated: most of its width is gone"),
        Option(
            "chance",
            1e-6,
            "equal units that a random init would give with this probability or more, at "
            "the values' precision, are not reported (float8 rows of 2 inputs collide often)",
        ),
    )

    def _severity(self, duplicated: int, units: int, effective: int, options: dict) -> Severity:
        if effective == 1 or duplicated / units >= options["error_fraction"]:
            return Severity.ERROR
        return Severity.WARNING

    @classmethod
    def request(cls, options: dict) -> Request:
        return Request(fingerprints=True, symmetry_rtol=options["rtol"])

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        out = []
        # layers whose own weights explain identical outputs downstream (reported or not:
        # a frozen constant layer is deliberate) and layers that feed the loss directly
        explained = {
            w.module
            for w in capture.weights
            if weight_groups(w, options) or not w.trainable or w.is_output
        }
        for w in capture.weights:
            if w.is_output or w.units < 2 or not w.trainable or not weight_groups(w, options):
                continue
            out.append(self._weight_finding(w, options))
        for site in capture.activation_sites():
            finding = self._activation_finding(capture, site, explained, options)
            if finding is not None:
                out.append(finding)
        return out

    def _weight_finding(self, w: WeightStats, options: dict) -> Finding:
        grouped, duplicated, effective = _describe(list(w.groups), w.units)
        constant = effective == 1
        how = (
            "exactly identical" if w.groups_exact else f"identical within rtol {options['rtol']:g}"
        )
        message = (
            f"{grouped} of {w.units} units form {len(w.groups)} group(s) of {how} incoming "
            f"weights: effective width {effective} of {w.units}"
        )
        if constant:
            message += " (the whole layer is constant, e.g. zero or constant init)"
            fix = (
                "initialize the layer randomly: units that start equal get equal gradients "
                "and stay equal; random init breaks the tie"
            )
            snippet = _REINIT.format(name=py_str(w.module))
        else:
            fix = (
                "re-initialize the duplicated units, or add a little noise to them if they "
                "were copied on purpose (net2net widening): equal units never diverge"
            )
            snippet = _NOISE.format(name=py_str(w.module))
        return self.finding(
            self._severity(duplicated, w.units, effective, options),
            w.module,
            message,
            {
                "units": w.units,
                "groups": len(w.groups),
                "grouped_units": grouped,
                "effective_width": effective,
                "largest_group": max(len(g) for g in w.groups),
                "exact": w.groups_exact,
                "first_group": ",".join(map(str, w.groups[0][:8])),
                "dtype": w.dtype,
                "chance_pairs": w.chance_pairs,
            },
            fix,
            snippet,
        )

    def _activation_finding(
        self, capture: Capture, site: SiteStats, covered: set[str], options: dict
    ) -> Finding | None:
        fp = site.unit_fingerprint
        if fp is None or site.units < 2:
            return None
        feeder = preceding_layer(capture, site)
        if feeder is not None and feeder.module in covered:
            return None  # the feeding layer's weights already explain it
        live = np.flatnonzero(fp[:, 3] > fp[:, 2])  # constant units are NH101/NH102's
        if live.size < 2:
            return None
        rtol = options["activation_rtol"]
        groups = []
        for g in near_duplicate_groups(fp[live, :2], rtol):
            # same projections; also the same range (a constant offset cancels in them)
            by_range: dict[tuple, list[int]] = {}
            for i in live[g]:
                key = tuple(np.round(fp[i, 2:] / (rtol * max(np.abs(fp[i, 2:]).max(), 1e-30))))
                by_range.setdefault(key, []).append(int(i))
            groups += [sorted(v) for v in by_range.values() if len(v) > 1]
        source = preceding_layer(capture, site, (LAYER, NORM))
        pinned = 2 if source is not None and source.role == NORM else 0
        groups = [g for g in groups if self._beyond_chance(site, g, live.size, pinned, options)]
        if not groups:
            return None
        grouped, duplicated, effective = _describe(groups, site.units)
        return self.finding(
            self._severity(duplicated, site.units, effective, options),
            site.name,
            f"{grouped} of {site.units} units form {len(groups)} group(s) with identical outputs "
            f"over the batch although their incoming weights differ: effective width "
            f"{effective} of {site.units} (the weights differ only where the inputs are "
            "zero or equal: symmetry created upstream)",
            {
                "units": site.units,
                "groups": len(groups),
                "grouped_units": grouped,
                "effective_width": effective,
                "first_group": ",".join(map(str, groups[0][:8])),
            },
            "find the upstream cause (dead or duplicated units feeding this layer, identical "
            "input features) and re-initialize the layers involved randomly",
            None if feeder is None else _REINIT.format(name=py_str(feeder.module)),
        )

    @staticmethod
    def _beyond_chance(
        site: SiteStats, group: list[int], live: int, pinned: int, options: dict
    ) -> bool:
        """Whether chance explains a group of units with equal outputs.

        The values that can tell two units apart are those strictly inside the unit's
        range and its top (a ReLU's zeros, a bound, are shared by many units), less the
        ``pinned`` ones that a normalization layer feeding it fixes (location and scale:
        BatchNorm over 2 values outputs -1 and +1 in every channel). Each agrees by
        chance with probability q = max(eps/2, activation_rtol) at the outputs'
        precision (eps: bfloat16 2**-7, float32 2**-23); among C(live, 2) pairs,
        q ** values of them.
        """
        counts = None if site.unit_interior is None else site.unit_interior[group]
        if counts is None or (counts < 0).any():
            return True  # not counted (a tolerance above the capture's 1e-4): no discount
        values = max(int(counts.min()) + 1 - pinned, 0)
        q = min(max(site.eps / 2, options["activation_rtol"]), 1.0)
        log_expected = math.log(live * (live - 1) / 2) + values * math.log(q)
        expected = math.exp(min(log_expected, 700.0))
        return chance_probability(_pairs([group]), expected) < options["chance"]

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        rows = {}
        for w in capture.weights:
            groups = weight_groups(w, options)
            rows[w.module] = {
                "symmetry_groups": len(groups),
                "effective_width": w.units - sum(len(g) - 1 for g in groups),
            }
        return rows

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        if not finding.layer or "exact" not in finding.evidence:
            return []  # equal outputs with different weights: the cause is upstream
        rule = init_rule(ctx.nonlinearity)
        return [
            reinit_fix(f"{rule.name} on {finding.layer}", finding.layer, rule),
            noise_fix(f"1% noise on {finding.layer}", finding.layer, 1e-2),
        ]

    def score(self, finding: Finding) -> float | None:
        return finding.evidence.get("grouped_units")

    def label(self, finding: Finding) -> str:
        e = finding.evidence
        return f"width {e.get('effective_width')}/{e.get('units')}"
