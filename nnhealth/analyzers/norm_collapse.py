"""NH103 norm-collapse."""

from __future__ import annotations

import math

from nnhealth.analyzers._advice import py_str
from nnhealth.analyzers._fixes import Fix, FixContext, submodule
from nnhealth.analyzers.base import Check, Option, deviation, num
from nnhealth.capture.stats import Capture, ParamStats
from nnhealth.findings import Finding, Severity

_DECAY_SNIPPET = (
    "# no weight decay on normalization scales and biases (1-d parameters)\n"
    "decay = [p for p in model.parameters() if p.ndim > 1]\n"
    "no_decay = [p for p in model.parameters() if p.ndim <= 1]\n"
    "optimizer = torch.optim.AdamW(\n"
    '    [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, weight_decay=wd\n'
    ")"
)


def _scales(capture: Capture) -> list[ParamStats]:
    """The scale (weight) of every affine normalization layer: BatchNorm, LayerNorm,
    GroupNorm, RMSNorm... (a bare state_dict does not say which tensors these are)."""
    return [
        p
        for p in capture.params
        if p.role == "norm" and p.name.rpartition(".")[2] == "weight" and p.shape
    ]


def _rms(p: ParamStats) -> float:
    return p.norm / math.sqrt(max(p.numel, 1))


class NormCollapse(Check):
    """Normalization layers whose scale has collapsed to zero.

    What it detects:
        The root-mean-square of each affine normalization layer's scale (gamma: the
        ``weight`` of BatchNorm, LayerNorm, GroupNorm, RMSNorm...). Below
        ``collapse_rms`` the layer outputs little but its shift (beta): the normalized
        signal is multiplied by almost nothing. Exactly zero and trainable with a
        non-zero gradient is the zero-init residual trick (torchvision's
        ``zero_init_residual``, a Transformer block's last norm at zero): reported as
        info, since gamma's gradient (the normalized input times the incoming gradient)
        moves it at the first step. Small but not zero is a scale that training drove
        down; frozen, or with a zero gradient, it cannot recover. The whole layer is
        judged (a parameter norm; single collapsed channels are not seen). A bare
        state_dict does not say which tensors are normalization scales: the check is
        skipped there.

    Why it matters:
        The gradient reaching the layer's input is multiplied by gamma: a collapsed
        scale shuts the signal and the gradient of every channel it covers, like dead
        units. The usual cause is weight decay applied to normalization scales, which
        pulls them towards zero with nothing to push back when their gradient is small.

    Example:
        A LayerNorm whose weight was shrunk to 1e-5 by weight decay: its outputs are
        its bias plus 1e-5 of the normalized signal, and the layers before it get
        1e-5 of their gradient through it.

    How to fix:
        Exclude normalization scales and biases from weight decay (a parameter group
        with ``weight_decay=0``, as timm's ``param_groups_weight_decay`` does); reset a
        collapsed scale with ``nn.init.ones_`` and, when it is frozen, let it train
        (``requires_grad_(True)``).
    """

    code = "NH103"
    name = "norm-collapse"
    summary = "normalization layers whose scale (gamma) collapsed to zero"
    needs = frozenset({"weights", "modules"})
    uses = frozenset({"gradients"})
    options = (
        Option(
            "collapse_rms",
            1e-3,
            "a scale under 1e-3 leaves the normalized signal 60 dB below unit variance",
        ),
    )

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        out = []
        for p in _scales(capture):
            rms = _rms(p)
            if math.isfinite(rms) and rms < options["collapse_rms"]:
                out.append(self._finding(p, rms))
        return out

    def _finding(self, p: ParamStats, rms: float) -> Finding:
        stuck = not p.trainable or p.grad_norm == 0.0
        evidence = {
            "parameter": p.name,
            "scale_rms": rms,
            "values": p.numel,
            "trainable": p.trainable,
            "grad_norm": p.grad_norm,
        }
        layer = py_str(p.module)
        reset = f"layer = model.get_submodule({layer})\nnn.init.ones_(layer.weight)"
        if stuck:
            why = "frozen" if not p.trainable else "its gradient is zero on this batch"
            return self.finding(
                Severity.ERROR,
                p.module,
                f"{p.kind} scale is {num(rms)} (RMS over {p.numel} values) and {why}: the "
                f"layer passes its shift and only {num(rms)}x of the normalized signal (and "
                "of the gradient to earlier layers), and training will not change that",
                evidence,
                "reset the scale to 1 (nn.init.ones_) and let it train",
                reset + "\nlayer.weight.requires_grad_(True)",
            )
        if rms == 0.0 and p.grad_norm is not None:
            return self.finding(
                Severity.INFO,
                p.module,
                f"{p.kind} scale is zero-initialized (the zero-init residual trick): its "
                f"gradient (norm {num(p.grad_norm)}) moves it at the first step",
                evidence,
                "nothing to do if the zero is deliberate (zero_init_residual); else "
                "initialize the scale to 1 (nn.init.ones_)",
            )
        return self.finding(
            Severity.WARNING,
            p.module,
            f"{p.kind} scale collapsed to {num(rms)} (RMS over {p.numel} values): the "
            "normalized signal, and the gradient to earlier layers, pass at that scale",
            evidence,
            "exclude normalization scales and biases from weight decay, and reset this "
            "scale to 1 (nn.init.ones_)",
            _DECAY_SNIPPET + "\n" + reset,
        )

    def metrics(self, capture: Capture, options: dict) -> dict[str, dict]:
        return {}  # the layer table already has each norm layer's scale norm (weight_norm)

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        module = finding.layer
        if module is None:
            return []

        def reset(model) -> str | None:
            from torch import nn

            layer = submodule(model, module)
            if layer is None or getattr(layer, "weight", None) is None:
                return f"{module} has no scale to reset"
            nn.init.ones_(layer.weight)
            return None

        return [Fix(f"ones_ on {module} scale", reset)]

    def score(self, finding: Finding) -> float | None:
        return deviation(finding.evidence.get("scale_rms"))  # orders of magnitude below 1

    def label(self, finding: Finding) -> str:
        return f"scale rms {finding.evidence.get('scale_rms', 0):.3g}"
