"""NH102 saturation."""

from __future__ import annotations

from nnhealth import nonlinearities
from nnhealth.analyzers._advice import py_str
from nnhealth.analyzers._fixes import Fix, FixContext, reinit_fix
from nnhealth.analyzers.base import Check, Option, num, pct
from nnhealth.analyzers.dead_relu import preceding_layer
from nnhealth.capture.stats import Capture
from nnhealth.findings import Finding, Severity
from nnhealth.nonlinearities import XAVIER, Init
from nnhealth.plan import Request


def desaturating_init(kind: str | None) -> Init:
    """The init for the layer feeding a saturated ``kind``: Xavier with the gain of a
    smooth one (tanh, sigmoid), plain Xavier for the hard ones."""
    entry = nonlinearities.lookup(kind)
    return entry.init if entry is not None and entry.derivative in {"tanh", "sigmoid"} else XAVIER


class Saturation(Check):
    """Sigmoid/tanh (and hard variants) units stuck where their derivative vanishes.

    What it detects:
        Per unit, the fraction of the batch for which a sigmoid, tanh, hardtanh,
        hardsigmoid or ReLU6 output sits in its saturated region: where the derivative
        is below ``derivative_fraction`` of its peak (tanh: |y| > 0.975 at the default
        5%; sigmoid: y < 0.013 or y > 0.987), or exactly at a bound for the hard
        variants (where the derivative is zero). The layer is judged on its fraction of
        saturated values (every example, position and unit); the finding also counts
        the units stuck, saturated on at least ``unit_fraction`` of the batch, and the
        mean derivative relative to its peak (from the output's moments: sigmoid'
        = y(1-y), tanh' = 1-y^2). The nonlinearity that produces the model's output is
        not judged: with a matching loss (BCE on a sigmoid) its gradient does not vanish.

    Why it matters:
        The gradient through a saturated unit is multiplied by a derivative near zero,
        so the weights feeding it barely move and the signal to earlier layers vanishes.
        The classic case: a tanh or sigmoid network initialized with W = randn has
        pre-activations of scale sqrt(fan_in) and almost every unit saturates.

    Example:
        A 5 x 500 tanh MLP with W = randn: about 95% of every hidden layer's outputs
        have |tanh| > 0.975 and the mean derivative is 4% of its peak.

    How to fix:
        Initialize the layer feeding the nonlinearity with Xavier/Glorot init (gain for
        tanh or sigmoid), normalize its input (BatchNorm/LayerNorm before the
        nonlinearity), lower the learning rate if weights grew during training, or use
        a ReLU-family activation in hidden layers (keep sigmoid for gates and outputs).
    """

    code = "NH102"
    name = "saturation"
    summary = "sigmoid/tanh (and hard variants) units stuck near their bounds"
    needs = frozenset({"activations"})
    options = (
        Option(
            "derivative_fraction",
            0.05,
            "a derivative under 5% of its peak passes less than 1/20 of the gradient",
        ),
        Option(
            "unit_fraction",
            0.90,
            "a unit saturated on 90% of the batch is stuck, not just confident on some inputs",
        ),
        Option(
            "warn_fraction",
            0.25,
            "a quarter of the gradient paths nearly closed slows learning measurably",
        ),
        Option(
            "error_fraction",
            0.50,
            "more than half closed: the rule DeepDiagnosis uses, most of the gradient is gone",
        ),
    )

    @classmethod
    def request(cls, options: dict) -> Request:
        return Request(saturation_derivative=options["derivative_fraction"])

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        out = []
        for site in capture.activation_sites():
            if site.saturated_count is None or site.is_output:
                continue  # an output sigmoid's gradient through the loss does not vanish
            frac = site.saturated_fraction_values or 0.0
            if frac < options["warn_fraction"]:
                continue
            severity = Severity.ERROR if frac >= options["error_fraction"] else Severity.WARNING
            stuck = site.saturated_units(options["unit_fraction"]) or 0
            deriv = site.mean_derivative
            entry = nonlinearities.lookup(site.kind)
            peak = None if entry is None else entry.peak
            ratio = deriv / peak if (deriv is not None and peak) else None
            feeder = preceding_layer(capture, site)
            if site.kind in {"tanh", "sigmoid"}:
                fix = (
                    f"initialize the layer feeding this {site.kind} with Xavier init, or "
                    f"normalize its input (BatchNorm/LayerNorm before the {site.kind})"
                )
            else:
                fix = (
                    f"scale down the input of this {site.kind} (smaller init or a "
                    "normalization layer before it) so it leaves its flat region"
                )
            snippet = None
            if feeder is not None:
                snippet = "\n".join(
                    [
                        f"layer = model.get_submodule({py_str(feeder.module)})",
                        desaturating_init(site.kind).snippet("layer.weight"),
                        "if layer.bias is not None:",
                        "    nn.init.zeros_(layer.bias)",
                    ]
                )
            deriv_txt = (
                f"; mean derivative {num(deriv)} ({pct(ratio)} of its peak)"
                if ratio is not None
                else ""
            )
            out.append(
                self.finding(
                    severity,
                    site.name,
                    f"{pct(frac)} of {site.kind} outputs saturated (derivative under "
                    f"{pct(options['derivative_fraction'])} of its peak); {stuck} of "
                    f"{site.units} units saturated on >= {pct(options['unit_fraction'])} of the "
                    f"batch{deriv_txt}",
                    {
                        "saturated_values_fraction": frac,
                        "saturated_units": stuck,
                        "units": site.units,
                        "saturated_units_fraction": stuck / site.units,
                        "mean_derivative": deriv,
                        "mean_derivative_ratio": ratio,
                    },
                    fix,
                    snippet,
                )
            )
        return out

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        rows = {}
        for s in capture.activation_sites():
            if s.saturated_count is None:
                continue
            stuck = s.saturated_units(options["unit_fraction"])
            rows[s.name] = {
                "saturated_units": stuck,
                "saturated_fraction": stuck / s.units,
                "mean_derivative": s.mean_derivative,
            }
        return rows

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        feeder = ctx.feeder(finding.layer)
        if feeder is None or feeder.get("role") != "layer":
            return []  # a norm layer (or nothing) feeds it: no init to change
        rule = desaturating_init((ctx.row(finding.layer) or {}).get("kind"))
        return [reinit_fix(f"{rule.name} on {feeder['module']}", feeder["module"], rule)]

    def score(self, finding: Finding) -> float | None:
        return finding.evidence.get("saturated_values_fraction")

    def label(self, finding: Finding) -> str:
        return f"{100 * finding.evidence.get('saturated_values_fraction', 0):.0f}% saturated"
