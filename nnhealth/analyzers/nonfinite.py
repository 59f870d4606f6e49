"""NH001 nonfinite."""

from __future__ import annotations

import math

from nnhealth.analyzers._fixes import Fix, FixContext, reinit_fix
from nnhealth.analyzers.base import Check
from nnhealth.capture.stats import Capture, ParamStats, SiteStats
from nnhealth.findings import Finding, Severity
from nnhealth.nonlinearities import init_rule

_CLIP_SNIPPET = "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)"
_DEBUG_SNIPPET = (
    "with torch.autograd.detect_anomaly():  # names the backward op that made the NaN\n"
    "    loss = loss_fn(model(x), y)\n"
    "    loss.backward()"
)


# the largest finite value of the narrow-range dtypes: an overflow there is the dtype's
NARROW_RANGE = {"float16": 65504.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def _range_note(dtype: str) -> str:
    top = NARROW_RANGE.get(dtype)
    if top is None:
        return ""
    return (
        f" (this layer computes in {dtype}, whose largest finite value is {top:g}: "
        "bfloat16 has float32's range)"
    )


class Nonfinite(Check):
    """NaN or Inf in the weights, the loss, a layer's output or a gradient.

    What it detects:
        Non-finite values anywhere in the pass: in a parameter tensor, in the loss, in
        the output of a layer or nonlinearity, or in a gradient. For activations it names
        the first layer (in execution order) whose output holds a NaN/Inf, which is where
        the problem starts: every later layer inherits it. For gradients it names the
        first layer in the backward pass whose output gradient is non-finite.

    Why it matters:
        One NaN spreads to every value it touches: after one optimizer step the weights
        it reached are NaN and training is over. Inf usually means overflow (exploding
        activations, a too-high learning rate, log(0), division by a zero variance).

    Example:
        A checkpoint saved after a divergent step has one NaN in ``fc2.weight``; every
        example's output of ``fc2`` is NaN, and so is the loss. nnhealth reports the
        weight, the first layer whose output went bad, and the loss.

    How to fix:
        Restore the last finite checkpoint, then remove the cause: lower the learning
        rate, clip gradients (``torch.nn.utils.clip_grad_norm_``), add an epsilon to
        logs and divisions, or use a numerically stable loss (``cross_entropy`` on
        logits, ``BCEWithLogitsLoss`` instead of sigmoid + BCE).
        ``torch.autograd.detect_anomaly()`` names the backward operation that made it.
        A float16 model overflows above 65504 (float8 e4m3 above 448): the message says
        so when the layer ran in such a dtype; bfloat16 has float32's range.
    """

    code = "NH001"
    name = "nonfinite"
    summary = "NaN/Inf in weights, loss, activations or gradients; names the first layer"
    needs = frozenset({"weights"})
    uses = frozenset({"activations", "gradients"})

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        out = [self._parameter(p) for p in capture.params if p.nonfinite]
        bad = [s for s in capture.sites if s.nonfinite]
        if bad:
            out.append(self._activation(capture, bad))
        if capture.loss is not None and not math.isfinite(capture.loss):
            out.append(
                self.finding(
                    Severity.ERROR,
                    None,
                    f"the loss is {capture.loss}",
                    {"loss": None},
                    "use a numerically stable loss on logits (F.cross_entropy, "
                    "BCEWithLogitsLoss) and check the targets' range",
                    None,
                    kind="loss",
                )
            )
        if not bad:
            out += self._gradient(capture)
        return out

    def _parameter(self, p: ParamStats) -> Finding:
        return self.finding(
            Severity.ERROR,
            p.module or None,
            f"parameter {p.name} holds {p.nonfinite} NaN/Inf of {p.numel} values",
            {"parameter": p.name, "nonfinite": p.nonfinite, "values": p.numel},
            "restore this parameter from the last finite checkpoint, then lower "
            "the learning rate or clip gradients so the update cannot overflow",
            _CLIP_SNIPPET,
            kind="parameter",
        )

    def _activation(self, capture: Capture, bad: list[SiteStats]) -> Finding:
        """The first layer whose output holds a NaN/Inf."""
        first = min(bad, key=lambda s: s.order)
        weights_bad = any(p.nonfinite and p.module == first.module for p in capture.params)
        cause = (
            "its own parameters are non-finite"
            if weights_bad
            else "every layer before it produced finite values"
        )
        return self.finding(
            Severity.ERROR,
            first.name,
            f"first non-finite activation: {first.nonfinite} of {first.total} values "
            f"in the output of {first.name} ({first.kind}) are NaN/Inf; {cause}; "
            f"{len(bad)} layer(s) in all{_range_note(first.dtype)}",
            {
                "nonfinite": first.nonfinite,
                "values": first.total,
                "layers_affected": len(bad),
            },
            "find what overflows in this layer: its input scale, its weights, or an "
            "unsafe operation (log, division, exp); normalize the input or clamp",
            _DEBUG_SNIPPET,
            kind="activation",
        )

    def _gradient(self, capture: Capture) -> list[Finding]:
        """With a finite forward pass: the first layer of the backward pass whose output
        gradient is non-finite, else the parameters whose gradient is."""
        grad_bad = [s for s in capture.sites if s.grad_nonfinite and s.grad_order is not None]
        if grad_bad:
            first = min(grad_bad, key=lambda s: s.grad_order)
            return [
                self.finding(
                    Severity.ERROR,
                    first.name,
                    f"the gradient turns non-finite in the backward pass at {first.name}: "
                    f"{first.grad_nonfinite} of {first.grad_count} values NaN/Inf, while the "
                    f"forward pass was finite{_range_note(first.dtype)}",
                    {"nonfinite": first.grad_nonfinite, "values": first.grad_count},
                    "clip gradients and look for an operation with an unbounded derivative "
                    "(sqrt at 0, log near 0, division by a small number)",
                    _DEBUG_SNIPPET,
                    kind="gradient",
                )
            ]
        worst = [p for p in capture.params if p.grad_nonfinite]
        if not worst:
            return []
        names = ", ".join(p.name for p in worst[:5])
        return [
            self.finding(
                Severity.ERROR,
                worst[0].module or None,
                f"non-finite gradient in {len(worst)} parameter(s): {names}",
                {"parameters": len(worst)},
                "clip gradients and check the loss for unstable operations",
                _CLIP_SNIPPET,
                kind="gradient",
            )
        ]

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        return {}  # the layer table already counts each layer's nonfinite values

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        if "parameter" not in finding.evidence:
            return []  # only a parameter's values can be replaced in memory
        module = str(finding.evidence["parameter"]).rpartition(".")[0]
        rule = init_rule(ctx.nonlinearity)
        label = f"{rule.name} on {module} (instead of the non-finite values)"
        return [reinit_fix(label, module, rule)]

    def score(self, finding: Finding) -> float | None:
        return finding.evidence.get("nonfinite") or finding.evidence.get("parameters")

    def label(self, finding: Finding) -> str:
        return finding.message[:60]
