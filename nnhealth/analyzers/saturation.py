"""NH102 saturation."""

from __future__ import annotations

import math

from nnhealth import nonlinearities
from nnhealth.analyzers._advice import py_str
from nnhealth.analyzers._fixes import Fix, FixContext, reinit_fix
from nnhealth.analyzers.base import Check, Option, num, pct
from nnhealth.analyzers.dead_relu import preceding_layer
from nnhealth.capture.stats import LAYER, NORM, Capture, GateStats, SiteStats
from nnhealth.findings import Finding, Severity
from nnhealth.nonlinearities import XAVIER, Init
from nnhealth.plan import Request


def desaturating_init(kind: str | None) -> Init:
    """The init for the layer feeding a saturated ``kind``: Xavier with the gain of a
    smooth one (tanh, sigmoid), plain Xavier for the hard ones."""
    entry = nonlinearities.lookup(kind)
    return entry.init if entry is not None and entry.derivative in {"tanh", "sigmoid"} else XAVIER


def loss_sensitivity(capture: Capture, site: SiteStats) -> float | None:
    """sqrt(n) ||dL/dz|| / L at the pre-activations z of the nonlinearity ``site`` (the
    n outputs of the layer that ran just before it): the relative change of the loss for a
    unit step of every pre-activation along the gradient. A loss that undoes the
    saturation (BCE on a sigmoid: dL/dz = y - t) keeps it near 1/|z|; one that does not
    (MSE on a saturated sigmoid: dL/dz = 2 (y - t) y (1 - y)) takes it to the derivative,
    1e-3 and below. Scale-free (a loss x c scales both). None when not measured: no
    backward, no positive finite loss, or no gradient at the layer."""
    loss = capture.loss
    if not capture.has_gradients or loss is None or not math.isfinite(loss) or loss <= 0:
        return None
    feeder = preceding_layer(capture, site, (LAYER, NORM))
    if feeder is None or not feeder.grad_count or feeder.grad_m2 is None:
        return None
    energy = feeder.grad_m2 + feeder.grad_count * (feeder.grad_mean or 0.0) ** 2
    if not math.isfinite(energy):
        return None
    return math.sqrt(feeder.grad_count * energy) / loss


def _logits_loss(kind: str) -> str:
    """The loss on the pre-activation that replaces a loss on ``kind``'s values."""
    if kind in {"sigmoid", "hardsigmoid"}:
        return f"return the logits (drop the {kind}) and train with nn.BCEWithLogitsLoss()"
    return f"return the pre-activation (drop the {kind}) and compute the loss on it"


def _hidden_fix(kind: str) -> str:
    if kind in {"tanh", "sigmoid"}:
        return (
            f"initialize the layer feeding this {kind} with Xavier init, or "
            f"normalize its input (BatchNorm/LayerNorm before the {kind})"
        )
    return (
        f"scale down the input of this {kind} (smaller init or a "
        "normalization layer before it) so it leaves its flat region"
    )


def _output_fix(kind: str) -> str:
    return (
        f"compute the loss on the pre-activation: {_logits_loss(kind)} (F.cross_entropy on "
        "the logits for classes), which keeps the gradient however confident the output; or "
        f"scale down the layer feeding it (init below) or its inputs so the {kind} leaves "
        "its flat region"
    )


def _past_the_loss(capture: Capture, site: SiteStats) -> bool:
    """No gradient reached ``site`` or any site after it, while one reached a site before
    it: an output the loss does not use, whose saturation blocks no gradient. (Sites of a
    checkpointed block get no gradient either, but the sites after them do.)"""
    if not capture.has_gradients:
        return False
    before = any(s.grad_count for s in capture.sites if s.order < site.order)
    return before and not any(s.grad_count for s in capture.sites if s.order >= site.order)


# what a gate stuck on its harmful side does: (gate, side) -> consequence; side "low"
# counts values at or below the low bound, "high" at or above the high one
_GATE_HARM: dict[tuple[str, str], str] = {
    ("forget", "low"): "the cell state is erased at every step: nothing is remembered and "
    "the gradient through time vanishes",
    ("input", "low"): "nothing is written to the cell state",
    ("output", "low"): "the hidden state is near 0: the layer passes almost no signal",
    ("cell", "low"): "the candidate values sit at -1: their gradient vanishes",
    ("cell", "high"): "the candidate values sit at +1: their gradient vanishes",
    ("reset", "low"): "the candidate state ignores the previous hidden state",
    ("update", "low"): "the state is replaced at every step: nothing is remembered",
    ("update", "high"): "the state never changes: the input is ignored",
    ("new", "low"): "the candidate values sit at -1: their gradient vanishes",
    ("new", "high"): "the candidate values sit at +1: their gradient vanishes",
}


def gate_saturation(g: GateStats) -> tuple[float, str]:
    """(share of values on the gate's harmful side, that side): a closed sigmoid gate
    (a forget gate near 1 keeps memory and is no harm), either end of a GRU update gate
    or of a tanh candidate."""
    if not g.values:
        return 0.0, "low"
    low, high = g.below / g.values, g.above / g.values
    if (g.gate, "high") in _GATE_HARM and high > low:
        return high, "high"
    return low, "low"


def gate_bias_change(gate: GateStats, bias_driven: bool) -> tuple[int, float, bool]:
    """(chunk, b_ih value, reset_parameters first) of the fix: a bias that closes the gate
    goes to 1 for an LSTM forget gate (Jozefowicz et al. 2015), to 0 for another gate;
    weights that saturate it are re-initialized, with the LSTM forget bias at 1."""
    if bias_driven:
        return gate.chunk, 1.0 if gate.gate == "forget" else 0.0, False
    if gate.kind.startswith("LSTM"):
        return 1, 1.0, True
    return gate.chunk, 0.0, True


def gate_chunk_lines(module: str, gate: GateStats, suffixes: list[str], bias_driven: bool):
    """Snippet lines making the change of ``gate_bias_change`` on each of ``suffixes``."""
    chunk, value, reset = gate_bias_change(gate, bias_driven)
    lines = [f"rnn = model.get_submodule({py_str(module)})"]
    if reset:
        lines.append("rnn.reset_parameters()  # uniform(-1/sqrt(hidden), 1/sqrt(hidden))")
    lstm = gate.kind.startswith("LSTM")
    names = ("input", "forget", "cell", "output") if lstm else ("reset", "update", "new")
    order = "i, f, g, o" if lstm else "r, z, n"
    rows = {0: ": h", 1: "h : 2 * h"}.get(chunk, f"{chunk} * h : {chunk + 1} * h")
    lines += ["h = rnn.hidden_size", f"with torch.no_grad():  # {names[chunk]} gate ({order})"]
    for suffix in suffixes:
        lines.append(f"    rnn.bias_ih{suffix}[{rows}].fill_({value})")
        lines.append(f"    rnn.bias_hh{suffix}[{rows}].zero_()")
    return lines


def _set_gate_bias(module: str, chunk: int, suffixes: list[str], value: float, reset: bool):
    """--what-if: the gate's bias chunk to ``value`` (b_ih) and 0 (b_hh) on each suffix,
    after ``reset_parameters()`` when ``reset``."""

    def apply(model) -> str | None:
        import torch

        from nnhealth.analyzers._fixes import submodule

        rnn = submodule(model, module)
        if rnn is None:
            return f"no module {module}"
        if reset:
            rnn.reset_parameters()
        h = rnn.hidden_size
        with torch.no_grad():
            for suffix in suffixes:
                for name, v in (("bias_ih", value), ("bias_hh", 0.0)):
                    bias = getattr(rnn, name + suffix, None)
                    if bias is not None:
                        bias[chunk * h : (chunk + 1) * h].fill_(v)
        return None

    return apply


def _gate_of(finding: Finding) -> GateStats:
    """The gate a finding names, enough of it for ``gate_bias_change``."""
    e = finding.evidence
    kind, _, rest = finding.message.partition(" ")
    gate = rest.split(": ", 1)[1].split(" gate", 1)[0]
    return GateStats(
        finding.layer or "",
        kind,
        int(e["layer"]),
        int(e["direction"]),
        gate,
        "",
        int(e["chunk"]),
        0,
        0,
        0,
        0.0,
        1.0,
        0.0,
        0.0,
        0.0,
    )


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
        = y(1-y), tanh' = 1-y^2).

        The nonlinearity that produces the model's output feeds the loss, and a loss
        can undo its saturation: BCE on a sigmoid has dL/dz = y - t at the
        pre-activation z, however flat the sigmoid. It is judged only when the measured
        gradient says the loss does not: the loss sensitivity sqrt(n) ||dL/dz|| / L
        (the relative change of the loss for a unit step of every pre-activation, scale
        free) under ``collapse_sensitivity``. Measured on a sigmoid head whose
        pre-activations sit near +8 or -12 (tests/test_output_nonlinearity.py): BCE on
        its values 0.12-0.18 (intact); MSE 1.1e-3 and 2.2e-5, cross-entropy on its
        values as if they were logits 5.8e-4 and 1.4e-5, MSE on a tanh near +4 3e-3
        (collapsed); an unsaturated head 0.95; pre-activations of std 16, saturated on
        part of the batch, still pass gradient through the rest (0.1-0.25). With no
        gradient (no backward, or a loss that is not positive) the output is not judged.
        A nonlinearity the loss does not use at all (probabilities returned beside the
        logits the loss takes: no gradient reaches it or anything after it) is not
        judged either.

    Why it matters:
        The gradient through a saturated unit is multiplied by a derivative near zero,
        so the weights feeding it barely move and the signal to earlier layers vanishes.
        The classic case: a tanh or sigmoid network initialized with W = randn has
        pre-activations of scale sqrt(fan_in) and almost every unit saturates.

    Example:
        A 5 x 500 tanh MLP with W = randn: about 95% of every hidden layer's outputs
        have |tanh| > 0.975 and the mean derivative is 4% of its peak. A regression head
        sigmoid(Linear) with a bias of 8, trained with MSE on the sigmoid's output:
        every output saturated, loss sensitivity 1.1e-3: an error on the sigmoid.

    How to fix:
        Initialize the layer feeding the nonlinearity with Xavier/Glorot init (gain for
        tanh or sigmoid), normalize its input (BatchNorm/LayerNorm before the
        nonlinearity), lower the learning rate if weights grew during training, or use
        a ReLU-family activation in hidden layers (keep sigmoid for gates and outputs).
        For a saturated output: compute the loss on the logits (nn.BCEWithLogitsLoss,
        F.cross_entropy) instead of on the sigmoid's values, or scale the last layer.
    """

    code = "NH102"
    name = "saturation"
    summary = "sigmoid/tanh (and hard variants) units stuck near their bounds"
    needs = frozenset({"activations"})
    uses = frozenset({"gradients"})  # whether the loss undoes an output's saturation
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
        Option(
            "collapse_sensitivity",
            0.01,
            "a unit step of every output pre-activation changing the loss by under 1%: BCE on "
            "a saturated sigmoid measured 0.12-0.18 (intact), MSE on it 2e-5 to 3e-3",
        ),
    )

    @classmethod
    def request(cls, options: dict) -> Request:
        return Request(saturation_derivative=options["derivative_fraction"])

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        out = []
        for site in capture.activation_sites():
            if site.saturated_count is None:
                continue
            frac = site.saturated_fraction_values or 0.0
            if frac < options["warn_fraction"]:
                continue
            if _past_the_loss(capture, site):
                continue  # e.g. probabilities returned beside the logits the loss uses
            sensitivity = None
            if site.is_output:
                sensitivity = loss_sensitivity(capture, site)
                if sensitivity is None or sensitivity >= options["collapse_sensitivity"]:
                    continue  # the loss undoes the saturation (or no gradient to tell)
            out.append(self._site_finding(capture, site, frac, sensitivity, options))
        return out + self._gate_findings(capture, options)

    def _site_finding(
        self,
        capture: Capture,
        site: SiteStats,
        frac: float,
        sensitivity: float | None,
        options: dict,
    ) -> Finding:
        """One saturated nonlinearity; ``sensitivity`` (the output's, see
        ``loss_sensitivity``) is set when it produces the model's output."""
        severity = Severity.ERROR if frac >= options["error_fraction"] else Severity.WARNING
        stuck = site.saturated_units(options["unit_fraction"]) or 0
        deriv = site.mean_derivative
        entry = nonlinearities.lookup(site.kind)
        peak = None if entry is None else entry.peak
        ratio = deriv / peak if (deriv is not None and peak) else None
        feeder = preceding_layer(capture, site)
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
        evidence = {
            "saturated_values_fraction": frac,
            "saturated_units": stuck,
            "units": site.units,
            "saturated_units_fraction": stuck / site.units,
            "mean_derivative": deriv,
            "mean_derivative_ratio": ratio,
        }
        message = (
            f"{pct(frac)} of {site.kind} outputs saturated (derivative under "
            f"{pct(options['derivative_fraction'])} of its peak); {stuck} of "
            f"{site.units} units saturated on >= {pct(options['unit_fraction'])} of the "
            f"batch{deriv_txt}"
        )
        if sensitivity is None:
            fix = _hidden_fix(site.kind)
        else:
            evidence["loss_sensitivity"] = sensitivity
            message += (
                f"; it is the model's output and the loss, computed on it, does not undo the "
                f"saturation: a unit step of every pre-activation changes the loss by "
                f"{pct(sensitivity)} (the gradient collapses across the {site.kind})"
            )
            fix = _output_fix(site.kind)
            if snippet is not None:
                snippet += f"\n# or: {_logits_loss(site.kind)}"
        return self.finding(severity, site.name, message, evidence, fix, snippet)

    def _gate_findings(self, capture: Capture, options: dict) -> list[Finding]:
        """One finding per recurrent module and gate whose harmful side holds at least
        ``warn_fraction`` of its values, at its worst layer/direction."""
        flagged: dict[tuple[str, str], list[tuple[float, str, GateStats]]] = {}
        for g in capture.gates:
            frac, side = gate_saturation(g)
            if frac >= options["warn_fraction"]:
                flagged.setdefault((g.module, g.gate), []).append((frac, side, g))
        return [self._gate_finding(hits, options) for hits in flagged.values()]

    def _gate_finding(self, hits: list[tuple[float, str, GateStats]], options: dict) -> Finding:
        frac, side, g = max(hits, key=lambda h: h[0])
        severity = Severity.ERROR if frac >= options["error_fraction"] else Severity.WARNING
        suffixes = [h[2].suffix for h in hits]
        bias_driven = abs(g.pre_mean) > g.pre_std
        where = f"layer {g.layer}" + (" (reverse)" if g.direction else "")
        bound = f"at or below {g.lo:.3g}" if side == "low" else f"at or above {g.hi:.3g}"
        others = f" ({len(hits) - 1} more layer/direction(s) too)" if len(hits) > 1 else ""
        if bias_driven and g.gate == "forget":
            fix = (
                "set the forget-gate bias to 1 (Jozefowicz et al. 2015): the bias_ih forget "
                "chunk to 1, the bias_hh one to 0, so the gate starts near 0.73 and the cell "
                "keeps its state"
            )
        elif bias_driven:
            fix = f"reset the {g.gate}-gate bias to 0 so the gate starts near 0.5"
        else:
            fix = (
                "its weights, not its bias, push the gate to its bound: re-initialize the "
                "module (reset_parameters) and set the forget-gate bias to 1"
            )
        return self.finding(
            severity,
            g.module,
            f"{g.kind} {g.module}: {g.gate} gate of {where}: {pct(frac)} of its {g.values} "
            f"values {bound} (derivative under {pct(options['derivative_fraction'])} of its "
            f"peak), mean {num(g.mean)}; {_GATE_HARM[(g.gate, side)]}{others}",
            {
                "saturated_values_fraction": frac,
                "values": g.values,
                "gate_mean": g.mean,
                "preactivation_mean": g.pre_mean,
                "preactivation_std": g.pre_std,
                "layer": g.layer,
                "direction": g.direction,
                "chunk": g.chunk,
                "layers_flagged": len(hits),
                "suffixes": ",".join(suffixes),
            },
            fix,
            "\n".join(gate_chunk_lines(g.module, g, suffixes, bias_driven)),
        )

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
        e = finding.evidence
        if "suffixes" in e:  # a recurrent gate
            suffixes = str(e["suffixes"]).split(",")
            bias_driven = abs(e["preactivation_mean"]) > e["preactivation_std"]
            gate = _gate_of(finding)
            chunk, value, reset = gate_bias_change(gate, bias_driven)
            named = "forget" if reset and gate.kind.startswith("LSTM") else gate.gate
            label = "reset_parameters + " if reset else ""
            label += f"{named}-gate bias {value:g} on {finding.layer}"
            return [Fix(label, _set_gate_bias(finding.layer, chunk, suffixes, value, reset))]
        feeder = ctx.feeder(finding.layer)
        if feeder is None or feeder.get("role") != "layer":
            return []  # a norm layer (or nothing) feeds it: no init to change
        rule = desaturating_init((ctx.row(finding.layer) or {}).get("kind"))
        return [reinit_fix(f"{rule.name} on {feeder['module']}", feeder["module"], rule)]

    def score(self, finding: Finding) -> float | None:
        return finding.evidence.get("saturated_values_fraction")

    def label(self, finding: Finding) -> str:
        return f"{100 * finding.evidence.get('saturated_values_fraction', 0):.0f}% saturated"
