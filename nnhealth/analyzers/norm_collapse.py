"""NH103 norm-collapse."""

from __future__ import annotations

import math

from nnhealth.analyzers._advice import py_str
from nnhealth.analyzers._fixes import Fix, FixContext, submodule
from nnhealth.analyzers.base import Check, Option, deviation, num
from nnhealth.capture.stats import LAYER, NORM, Capture, ParamStats, SiteStats
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


def _energy(s: SiteStats) -> float | None:
    if not s.grad_count or s.grad_m2 is None or s.grad_mean is None:
        return None
    return s.grad_m2 + s.grad_count * s.grad_mean**2


def _cuts_off(site: SiteStats, ordered: list[SiteStats]) -> bool:
    """``site`` is the last norm and no site before it got any gradient."""
    if any(s.role == NORM for s in ordered if s.order > site.order):
        return False
    before = [e for e in (_energy(s) for s in ordered if s.order < site.order) if e is not None]
    return bool(before) and not any(before)


def _consumers(capture: Capture) -> dict[str, tuple[SiteStats, SiteStats]]:
    """For each normalization layer (its first call) whose output a parametric layer
    depends on alone: (the norm's site, that layer's site). Either the layer took the
    norm's output as its input, as the pass saw it (the same storage: GPT-2's
    ln_1/ln_2/ln_f, a ViT's norm1), or the norm is the last one and no gradient reached
    any site before it (a final norm pooled into the head: nothing bypasses it). A norm whose output is
    summed into a residual stream (ResNet's last BN of a block), or pooled into a
    squeeze-excitation gate there, has none: the layers before it still get gradient."""
    ordered = sorted(capture.sites, key=lambda s: s.order)
    out: dict[str, tuple[SiteStats, SiteStats]] = {}
    for site in ordered:
        if site.role != NORM or site.module in out:
            continue
        later = [s for s in ordered if s.order > site.order and s.role == LAYER]
        reader = next((s for s in later if s.reads == site.name), None)
        if reader is None and later and _cuts_off(site, ordered):
            reader = later[0]
        if reader is not None:
            out[site.module] = (site, reader)
    return out


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
    uses = frozenset({"gradients", "activations"})  # activations: what reads each norm
    options = (
        Option(
            "collapse_rms",
            1e-3,
            "a scale under 1e-3 leaves the normalized signal 60 dB below unit variance",
        ),
    )

    def run(self, capture: Capture, options: dict) -> list[Finding]:
        out = []
        consumers = _consumers(capture)
        grads = {q.name: q.grad_norm for q in capture.params}
        for p in _scales(capture):
            rms = _rms(p)
            if not (math.isfinite(rms) and rms < options["collapse_rms"]):
                continue
            norm, nxt = consumers.get(p.module, (None, None))
            grad = grads.get(f"{nxt.module}.weight") if nxt is not None else None
            if rms == 0.0 and p.grad_norm and nxt is not None:
                out.append(self._consumed_finding(p, norm, nxt, grad))
            else:
                out.append(self._finding(p, rms))
        return out

    def _consumed_finding(
        self, p: ParamStats, norm: SiteStats, nxt: SiteStats, grad: float | None
    ) -> Finding:
        """A zero gain whose output a layer reads directly: that layer's input is the
        norm's shift alone, the same for every example."""
        layer = py_str(p.module)
        grad_text = "" if grad is None else f", its weight gradient norm {num(grad)}"
        return self.finding(
            Severity.ERROR,
            p.module,
            f"{p.kind} scale is all zero and its output feeds {nxt.module} directly (a "
            f"pre-norm layer): {nxt.module} sees only the norm's shift, the same for every "
            f"example (the norm's measured output variance {num(norm.var)}{grad_text}), "
            f"and no gradient passes back through {p.module}",
            {
                "parameter": p.name,
                "scale_rms": 0.0,
                "values": p.numel,
                "grad_norm": p.grad_norm,
                "consumer_weight_grad_norm": grad,
                "output_var": norm.var,
            },
            "reset the scale to 1 (nn.init.ones_): a zero gain belongs only at the end of a "
            "residual branch (zero_init_residual), not before a layer",
            f"nn.init.ones_(model.get_submodule({layer}).weight)",
            "consumed",
        )

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
