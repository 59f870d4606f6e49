"""Fix texts shared by several checks: which initialization suits which nonlinearity."""

from __future__ import annotations

import json
from collections import Counter

from nnhealth import nonlinearities as nl
from nnhealth.capture.stats import Capture, WeightStats

# why each family's rule preserves the signal's variance
_RULE_TEXT = {
    nl.RELU: (
        "re-initialize Linear/Conv weights with He (Kaiming) init for {kind}: "
        "Var(w) = 2/fan_in keeps the signal's variance constant through depth"
    ),
    nl.SIGMOID: (
        "re-initialize Linear/Conv weights with Xavier (Glorot) init for {kind}: "
        "Var(w) = 2/(fan_in + fan_out) keeps forward and backward variance near constant"
    ),
    nl.LINEAR: (
        "re-initialize Linear/Conv weights with LeCun init (Var(w) = 1/fan_in), the "
        "variance-preserving choice for linear or SELU layers"
    ),
}


def dominant_nonlinearity(capture: Capture) -> str | None:
    kinds = Counter(s.kind for s in capture.activation_sites())
    return kinds.most_common(1)[0][0] if kinds else None


def init_fix(nonlinearity: str | None) -> tuple[str, str]:
    """(fix sentence, PyTorch snippet) re-initializing every Linear/Conv for ``nonlinearity``."""
    text = _RULE_TEXT[nl.family(nonlinearity) or nl.LINEAR].format(kind=nonlinearity)
    snippet = (
        "for m in model.modules():\n"
        "    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):\n"
        f"        {nl.init_rule(nonlinearity).snippet('m.weight')}\n"
        "        if m.bias is not None:\n"
        "            nn.init.zeros_(m.bias)"
    )
    return text + "; or put BatchNorm/LayerNorm between layers so the scale is reset", snippet


def py_str(name: str) -> str:
    """``name`` as a Python string literal for a fix snippet (double-quoted, with quotes,
    backslashes, newlines and control characters escaped): a layer name comes from the
    scanned file and must not turn the snippet into other code."""
    return json.dumps(name)


def zero_heads(capture: Capture) -> list[tuple[WeightStats, float | None]]:
    """Output layers with every weight exactly zero, trainable, and a gradient that is not
    zero (or not known), with that gradient's norm: a deliberate zero init (ViT's head)
    that training leaves at step one, not a layer that passes no signal for good."""
    grads = {p.name: p.grad_norm for p in capture.params}
    return [
        (w, grads.get(w.param))
        for w in capture.weights
        if w.is_output
        and w.trainable
        and w.var == 0.0
        and w.mean == 0.0
        and grads.get(w.param) != 0.0
    ]
