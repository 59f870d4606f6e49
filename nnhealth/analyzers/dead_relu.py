"""NH101 dead-relu."""

from __future__ import annotations

from nnhealth.analyzers._advice import py_str
from nnhealth.analyzers.base import Check, Option, pct
from nnhealth.capture.stats import LAYER, NORM, Capture, SiteStats
from nnhealth.findings import Finding, Severity


def preceding_layer(
    capture: Capture, site: SiteStats, roles: tuple[str, ...] = (LAYER,)
) -> SiteStats | None:
    """The last layer of ``roles`` that ran before ``site`` (the one feeding it, usually)."""
    before = [s for s in capture.sites if s.role in roles and s.order < site.order]
    return before[-1] if before else None


class DeadRelu(Check):
    """ReLU-family units that output zero for every example in the batch.

    What it detects:
        Per unit (a feature of a Linear layer, a channel of a convolution), whether a
        ReLU or ReLU6 output was zero for every example and every position in the batch.
        Such a unit also gets zero gradient, so nothing in training can bring it back.
        It counts the whole layer's dead units and reports the fraction. LeakyReLU,
        GELU, SiLU and ELU pass a gradient for negative inputs and are never dead.

    Why it matters:
        A dead unit is lost capacity that stays lost. Most units of a layer dying after a
        large update (a too-high learning rate, a large negative bias) is one of the
        commonest ways a ReLU network stops learning. Published rule engines count dead
        outputs (DeepDiagnosis: >= 70% of outputs <= 0); counting per unit measures what
        actually stops learning.

    Example:
        A ReLU MLP whose hidden biases were pushed to -3 by a bad step: 61% of the 500
        units of ``fc2`` are zero for all 1000 examples, so 61% of ``fc2``'s weights get
        no gradient.

    How to fix:
        Lower the learning rate (the usual cause); re-initialize the layer feeding the
        ReLU with He init and a small positive bias (0.01); or use LeakyReLU(0.01), PReLU,
        ELU or GELU, which keep a gradient on the negative side. With too few examples
        a healthy unit can look dead by chance, so the check needs ``min_examples``.
    """

    code = "NH101"
    name = "dead-relu"
    summary = "ReLU units that are zero for every example (and position) in the batch"
    needs = frozenset({"activations"})
    options = (
        Option("warn_fraction", 0.10, "a tenth of a layer dead is capacity worth recovering"),
        Option("error_fraction", 0.50, "half a layer dead: the layer is mostly not learning"),
        Option(
            "min_examples",
            16,
            "values per unit (examples x positions): a unit active on half of them looks "
            "dead on 16 with p = 1.5e-5",
        ),
    )

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        sites = [s for s in capture.activation_sites() if s.ever_active is not None]
        if not sites:
            return []
        examples = capture.examples or 0
        judged = [s for s in sites if s.per_unit_count >= options["min_examples"]]
        out = []
        if len(judged) < len(sites):
            out.append(
                self.finding(
                    Severity.INFO,
                    None,
                    f"{len(sites) - len(judged)} ReLU layer(s) see fewer than "
                    f"{options['min_examples']} values per unit in this batch of {examples}: "
                    "too few to call a unit dead",
                    {"examples": examples, "min_examples": options["min_examples"]},
                    f"scan with a batch of at least {options['min_examples']} examples",
                )
            )
        for site in judged:
            dead = site.dead_units or 0
            frac = dead / site.units
            if frac < options["warn_fraction"]:
                continue
            severity = Severity.ERROR if frac >= options["error_fraction"] else Severity.WARNING
            where = (
                "at every position of every example"
                if site.per_unit_count > examples
                else (f"for all {examples} examples")
            )
            unit = "channels" if site.unit_dim == 1 and len(site.shape) >= 3 else "units"
            feeder = preceding_layer(capture, site, (LAYER, NORM))
            fix = (
                "lower the learning rate if this followed training; re-initialize the layer "
                "feeding it with He init and a small positive bias; or switch to LeakyReLU"
            )
            lines = []
            if feeder is not None and feeder.role == NORM:
                fix = (
                    "lower the learning rate if this followed training; reset the shift of the "
                    "normalization layer feeding it (its negative bias keeps the units below 0); "
                    "or switch to LeakyReLU"
                )
                lines += [
                    f"norm = model.get_submodule({py_str(feeder.module)})",
                    "nn.init.zeros_(norm.bias)",
                    "nn.init.ones_(norm.weight)",
                ]
            elif feeder is not None:
                lines += [
                    f"layer = model.get_submodule({py_str(feeder.module)})",
                    'nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")',
                    "if layer.bias is not None:",
                    "    nn.init.constant_(layer.bias, 0.01)",
                ]
            if not site.functional:
                parent, _, attr = site.module.rpartition(".")
                target = f"model.get_submodule({py_str(parent)})" if parent else "model"
                lines.append(f"setattr({target}, {py_str(attr)}, nn.LeakyReLU(0.01))")
            else:
                where_fn = py_str(site.module)[1:-1] if site.module else "the model"
                lines.append(f"# in {where_fn}.forward: F.leaky_relu(x, 0.01)")
            out.append(
                self.finding(
                    severity,
                    site.name,
                    f"{pct(frac)} of {unit} dead ({dead} of {site.units}): zero {where}",
                    {
                        "dead_units": dead,
                        "units": site.units,
                        "dead_fraction": frac,
                        "examples": examples,
                        "values_per_unit": site.per_unit_count,
                    },
                    fix,
                    "\n".join(lines),
                )
            )
        return out
