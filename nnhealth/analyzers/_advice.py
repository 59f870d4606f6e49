"""Fix texts shared by several checks: which initialization suits which nonlinearity."""

from __future__ import annotations

import json
from collections import Counter

from nnhealth import nonlinearities as nl
from nnhealth.capture.stats import Capture, SiteStats, WeightStats

# why each family's rule preserves the signal's variance
_RULE_TEXT = {
    nl.RELU: (
        "re-initialize {what} with He (Kaiming) init for {kind}: "
        "Var(w) = 2/fan_in keeps the signal's variance constant through depth"
    ),
    nl.SIGMOID: (
        "re-initialize {what} with Xavier (Glorot) init for {kind}: "
        "Var(w) = 2/(fan_in + fan_out) keeps forward and backward variance near constant"
    ),
    nl.LINEAR: (
        "re-initialize {what} with LeCun init (Var(w) = 1/fan_in), the "
        "variance-preserving choice for linear or SELU layers"
    ),
}
# a ReLU-like kind with its own gain (GELU, SiLU...): Var(w) = 1/E[f(z)^2] / fan_in
_SMOOTH_TEXT = (
    "re-initialize {what} with the variance-preserving init for {kind}: "
    "Var(w) = {variance:.4g}/fan_in (1/E[{kind}(z)^2], z ~ N(0, 1)) keeps the signal's "
    "variance constant through depth"
)
_LAYER_TYPES = "(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)"


def dominant_nonlinearity(capture: Capture) -> str | None:
    """The nonlinearity that computes most of the network's activations (by output
    elements, not by call sites: an SE block's many small sigmoid gates do not outvote
    the SiLU path), among the kinds nonlinearities.py has an init rule for."""
    weight: Counter[str] = Counter()
    for s in capture.activation_sites():
        if nl.lookup(s.kind) is not None:
            weight[s.kind] += s.units * s.per_unit_count
    return weight.most_common(1)[0][0] if weight else None


def init_fix(nonlinearity: str | None, layers: list[str] | None = None) -> tuple[str, str]:
    """(fix sentence, PyTorch snippet) re-initializing Linear/Conv layers with the init
    rule of ``nonlinearity`` (nonlinearities.py): every such layer of the model, or
    only the ``layers`` named (a loop over ``model.get_submodule(name)``)."""
    rule = nl.init_rule(nonlinearity)
    call = rule.snippet("m.weight")
    if layers:
        names = ", ".join(py_str(n) for n in layers)
        shown = ", ".join(layers[:4]) + (" ..." if len(layers) > 4 else "")
        where = f"the weights of {shown}"
        head = f"for name in [{names}]:\n    m = model.get_submodule(name)\n"
    else:
        where = "Linear/Conv weights"
        head = f"for m in model.modules():\n    if isinstance(m, {_LAYER_TYPES}):\n"
    indent = "    " if layers else "        "
    snippet = (
        head
        + f"{indent}{call}\n"
        + f"{indent}if m.bias is not None:\n"
        + f"{indent}    nn.init.zeros_(m.bias)"
    )
    if rule.variance is not None:
        text = _SMOOTH_TEXT.format(what=where, kind=nonlinearity, variance=rule.variance)
    else:
        text = _RULE_TEXT[nl.family(nonlinearity) or nl.LINEAR].format(
            what=where, kind=nonlinearity
        )
    return text + "; or put BatchNorm/LayerNorm between layers so the scale is reset", snippet


# parametric layers whose weights an init_fix snippet re-initializes
INIT_KINDS = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def scoped_layers(capture: Capture, sites: list[SiteStats]) -> list[str] | None:
    """The Linear/Conv modules of ``sites`` for ``init_fix``; None when they are all of
    the model's Linear/Conv layers (the snippet then loops over the model)."""
    named = list(dict.fromkeys(s.module for s in sites if s.kind in INIT_KINDS))
    every = {w.module for w in capture.weights if w.kind in INIT_KINDS}
    if not named or not every or set(named) >= every:
        return None
    return named


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
