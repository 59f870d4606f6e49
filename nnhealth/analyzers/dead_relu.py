"""NH101 dead-relu."""

from __future__ import annotations

from nnhealth.analyzers._advice import py_str
from nnhealth.analyzers._fixes import (
    Fix,
    FixContext,
    reinit,
    reinit_fix,
    replace_submodule,
    submodule,
)
from nnhealth.analyzers.base import Check, Option, pct
from nnhealth.capture.stats import LAYER, NORM, Capture, SiteStats
from nnhealth.findings import Finding, Severity
from nnhealth.nonlinearities import HE, Init, he
from nnhealth.plan import Request


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

    @classmethod
    def request(cls, options: dict) -> Request:
        return Request(dead_units=True)

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
            if frac >= options["warn_fraction"]:
                out.append(self._finding(capture, site, dead, frac, options))
        return out

    def _finding(
        self, capture: Capture, site: SiteStats, dead: int, frac: float, options: dict
    ) -> Finding:
        examples = capture.examples or 0
        severity = Severity.ERROR if frac >= options["error_fraction"] else Severity.WARNING
        where = (
            "at every position of every example"
            if site.per_unit_count > examples
            else (f"for all {examples} examples")
        )
        unit = "channels" if site.unit_dim == 1 and len(site.shape) >= 3 else "units"
        fix, snippet = _fix(capture, site, preceding_layer(capture, site, (LAYER, NORM)))
        return self.finding(
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
            snippet,
        )

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        return {
            s.name: {"dead_units": s.dead_units, "dead_fraction": s.dead_units / s.units}
            for s in capture.activation_sites()
            if s.ever_active is not None
        }

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        if not finding.layer:
            return []  # the model-wide note on too few examples
        fixes = []
        feeder = ctx.feeder(finding.layer)
        if feeder is not None and feeder.get("role") == "norm":
            fixes.append(Fix(f"reset {feeder['module']} shift to 0", _reset_norm(feeder["module"])))
        elif feeder is not None and str(feeder.get("kind", "")).startswith("ConvTranspose"):
            fixes.append(
                Fix(f"He init + bias 0.01 on {feeder['module']}", _he_transposed(feeder["module"]))
            )
        elif feeder is not None:
            fixes.append(
                reinit_fix(f"He init + bias 0.01 on {feeder['module']}", feeder["module"], HE, 0.01)
            )
        row = ctx.row(finding.layer) or {}
        if row.get("functional"):
            inside = row.get("module") or "the model"
            why = (
                f"F.relu is called inside {inside}.forward: it cannot be swapped from outside; "
                "edit the forward to use F.leaky_relu"
            )
            fixes.append(Fix("LeakyReLU(0.01)", lambda model: why))
        else:
            where = row.get("module", finding.layer)
            for name, args, label in (
                ("LeakyReLU", (0.01,), "LeakyReLU(0.01)"),
                ("GELU", (), "GELU()"),
            ):
                fixes.append(Fix(f"{label} for {where}", _swap(where, name, args)))
        return fixes

    def score(self, finding: Finding) -> float | None:
        return finding.evidence.get("dead_fraction")

    def label(self, finding: Finding) -> str:
        return f"{100 * finding.evidence.get('dead_fraction', 0):.0f}% dead"


def he_rule(capture: Capture, layer: SiteStats) -> Init:
    """He init for ``layer``: torch's kaiming_normal_, or for a transposed convolution
    (whose fan-in torch.nn.init misreads) Var(w) = 2 / its fan-in."""
    w = next((w for w in capture.weights if w.module == layer.module), None)
    if w is not None and layer.kind.startswith("ConvTranspose"):
        return he(w.fan_in)
    return HE


def _he_transposed(module: str):
    """He init with the transposed convolution's own fan-in, bias 0.01."""

    def apply(model) -> None:
        from nnhealth.capture.weights import transposed_fans

        layer = submodule(model, module)
        reinit(layer, he(transposed_fans(layer)[0]), 0.01)

    return apply


def _fix(capture: Capture, site: SiteStats, feeder: SiteStats | None) -> tuple[str, str]:
    """(fix, snippet): reset the norm layer or re-initialize the layer feeding ``site``,
    and swap the ReLU for LeakyReLU."""
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
            he_rule(capture, feeder).snippet("layer.weight"),
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
    return fix, "\n".join(lines)


def _reset_norm(module: str):
    """Shift 0 and scale 1 on the norm layer ``module``."""

    def apply(model) -> None:
        import torch

        norm = submodule(model, module)
        with torch.no_grad():
            norm.bias.zero_()
            norm.weight.fill_(1.0)

    return apply


def _swap(module: str, cls: str, args: tuple):
    """Put a new ``nn.<cls>(*args)`` in place of the module ``module``."""

    def apply(model) -> None:
        from torch import nn

        replace_submodule(model, module, getattr(nn, cls)(*args))

    return apply
