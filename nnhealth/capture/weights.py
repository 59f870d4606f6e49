"""Per-layer weight statistics: scale against fan-in/fan-out, and duplicate units.

Works from a module (with the forward order and the nonlinearity after each layer that
the pass saw) or from a bare state_dict (key order; a 1-D ``weight`` is taken to be a
normalization layer; the nonlinearity is unknown).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nnhealth.capture.groups import near_duplicate_groups
from nnhealth.capture.precision import (
    collision_probability,
    dtype_name,
    exact32,
    moments64,
    readable,
)
from nnhealth.capture.stats import ACTIVATION, LAYER, NORM, SiteStats, WeightStats
from nnhealth.capture.structure import is_norm, is_norm_name
from nnhealth.nonlinearities import module_kind

JUDGED_TYPES: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)
JUDGED_NAMES = {
    t.__name__
    for t in (
        nn.Linear,
        nn.Bilinear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    )
}


def kind_of(module: nn.Module) -> str:
    """The module's class name; a scripted module's original one (RecursiveScriptModule
    hides it)."""
    return getattr(module, "original_name", None) or type(module).__name__


def judged(module: nn.Module) -> bool:
    return isinstance(module, JUDGED_TYPES) or kind_of(module) in JUDGED_NAMES


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """fan_in, fan_out as torch.nn.init computes them (receptive field included)."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def is_transposed(module: nn.Module) -> bool:
    return bool(getattr(module, "transposed", False)) and kind_of(module).startswith(
        "ConvTranspose"
    )


def transposed_fans(module: nn.Module) -> tuple[int | float, int]:
    """fan_in, fan_out of a transposed convolution (weight [in, out/groups, k...]).

    Each output value sums in/groups x prod(k) / prod(stride) input taps on average (each
    input value reaches prod(k) outputs per channel, and there are prod(stride) outputs
    per input): Var(y) = fan_in Var(w) Var(x) away from the borders. Each input value
    feeds out/groups x prod(k) outputs: the fan of the backward pass. torch.nn.init reads
    the weight as a convolution's and gets both wrong.
    """
    w = module.weight
    receptive = math.prod(w.shape[2:])
    stride = math.prod(module.stride)
    groups = max(int(module.groups), 1)
    fan_in = w.shape[0] // groups * receptive / stride
    return (int(fan_in) if fan_in.is_integer() else fan_in), w.shape[1] * receptive


def unit_rows(weight: torch.Tensor, transposed: bool, conv_groups: int) -> torch.Tensor:
    """The weight as one row per output unit (a transposed convolution's output channel
    g * out/groups + j is column j of group g's block of input channels)."""
    if not transposed:
        return weight
    g = max(conv_groups, 1)
    cin, per_group = weight.shape[0], weight.shape[1]
    blocks = weight.reshape(g, cin // g, per_group, *weight.shape[2:])
    return blocks.transpose(1, 2).reshape(g * per_group, cin // g, *weight.shape[2:])


def _groups(weight: torch.Tensor, bias: torch.Tensor | None, conv_groups: int, rtol: float):
    """Duplicate units: rows of [weight | bias], compared within each conv group.

    Narrow dtypes (bfloat16, float16, float8) are read as float32, which holds their
    values exactly: equal stored rows stay equal, distinct ones distinct.
    """
    rows = exact32(weight.detach()).reshape(weight.shape[0], -1)
    if bias is not None:
        rows = torch.cat([rows, exact32(bias.detach()).reshape(-1, 1).to(rows.dtype)], dim=1)
    rows = rows.cpu().numpy()
    per_group = rows.shape[0] // max(conv_groups, 1)
    found: list[tuple[int, ...]] = []
    for g in range(max(conv_groups, 1)):
        block = rows[g * per_group : (g + 1) * per_group]
        for grp in near_duplicate_groups(block, rtol):
            found.append(tuple(i + g * per_group for i in grp))
    exact = all((rows[list(grp)] == rows[grp[0]]).all() for grp in found)
    return tuple(found), exact


def chance_pairs(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_groups: int,
    rtol: float,
    weight_var: float,
) -> float:
    """Pairs of units expected to be equal by chance under a random init of the layer's
    own scale, stored in its dtype: C(units per group, 2) * groups * P(two rows equal),
    P = q_w ** row_length * q_b with q the dtype's collision probability.

    Weights with no spread at all are not random (a constant layer is what the symmetry
    check exists for): 0. A bias with no spread (all zero) cannot tell units apart: q_b 1.
    """
    if not weight_var > 0:
        return 0.0
    groups = max(conv_groups, 1)
    per_group = weight.shape[0] // groups
    if per_group < 2:
        return 0.0
    length = weight[0].numel()
    log_p = length * math.log(collision_probability(weight.dtype, math.sqrt(weight_var), rtol))
    if bias is not None and bias.numel() > 1:
        _, bias_var = moments64(bias)
        q_b = collision_probability(bias.dtype, math.sqrt(max(bias_var, 0.0)), rtol)
        log_p += math.log(q_b)
    log_pairs = math.log(groups * per_group * (per_group - 1) / 2)
    return math.exp(min(log_pairs + log_p, 700.0))


def _usable_bias(bias: object, weight: torch.Tensor) -> torch.Tensor | None:
    """The bias to compare units with: one readable float per unit (row of ``weight``),
    else none."""
    if (
        isinstance(bias, torch.Tensor)
        and readable(bias)
        and bias.numel() == weight.shape[0]
        and bias.device == weight.device
    ):
        return bias
    return None


def _stats(
    module: str,
    param: str,
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    trainable: bool,
    order: int,
    followed_by: str | None,
    is_output: bool,
    conv_groups: int,
    rtol: float | None,
    transposed: tuple[int | float, int] | None = None,
) -> WeightStats:
    """``transposed``: the fans of a transposed convolution (its units are the weight's
    dim 1 within each group)."""
    w = weight.detach()
    fan_in, fan_out = fans(tuple(w.shape)) if transposed is None else transposed
    mean, var = moments64(w)  # float64 whatever the dtype: a bfloat16 sum drifts
    rows = unit_rows(w, transposed is not None, conv_groups)
    usable = _usable_bias(bias, rows)
    groups, exact, chance = ((), True, 0.0)
    if rtol is not None and rows.shape[0] > 1:
        groups, exact = _groups(rows, usable, conv_groups, rtol)
        if groups:
            chance = chance_pairs(rows, usable, conv_groups, rtol, var)
    return WeightStats(
        module=module,
        param=param,
        kind=kind,
        shape=tuple(w.shape),
        fan_in=fan_in,
        fan_out=fan_out,
        unit_count=rows.shape[0],
        mean=mean,
        var=var,
        trainable=trainable,
        order=order,
        followed_by=followed_by,
        is_output=is_output,
        groups=groups,
        groups_exact=exact,
        dtype=dtype_name(w.dtype),
        chance_pairs=chance,
    )


def _next_from_sites(sites: tuple[SiteStats, ...]) -> tuple[dict[str, str], list[str]]:
    """For each layer module: what its first call's output went through next; and the
    layer modules in forward order."""
    ordered = sorted(sites, key=lambda s: s.order)
    follow: dict[str, str] = {}
    layers: list[str] = []
    for i, site in enumerate(ordered):
        if site.role != LAYER or site.module in follow:
            continue
        layers.append(site.module)
        nxt = next((s for s in ordered[i + 1 :] if s.role in (LAYER, NORM, ACTIVATION)), None)
        if nxt is None or nxt.role == LAYER:
            follow[site.module] = "none"
        elif nxt.role == NORM:
            follow[site.module] = "norm"
        else:
            follow[site.module] = nxt.kind
    return follow, layers


def _next_from_modules(model: nn.Module) -> dict[str, str]:
    """Without a pass: the next leaf module in registration order."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    follow = {}
    for i, (name, mod) in enumerate(leaves):
        if not judged(mod):
            continue
        follow[name] = "none"
        for _, nxt in leaves[i + 1 :]:
            kind = kind_of(nxt)  # a scripted module's original class name too
            if is_norm(nxt) or is_norm_name(kind):
                follow[name] = "norm"
            elif module_kind(kind) is not None:
                follow[name] = module_kind(kind)
            elif isinstance(nxt, (nn.Dropout, nn.Identity, nn.Flatten)) or not any(
                True for _ in nxt.parameters(recurse=False)
            ):
                continue  # pooling, dropout, reshaping: look further
            break
    return follow


def from_model(
    model: nn.Module, sites: tuple[SiteStats, ...], rtol: float | None
) -> tuple[WeightStats, ...]:
    """Weight stats of every Linear/Conv layer, in forward order when the pass ran."""
    if sites:
        follow, order = _next_from_sites(sites)
    else:
        follow, order = _next_from_modules(model), []
    modules = dict(model.named_modules())
    candidates = [n for n, m in modules.items() if judged(m)]
    seen = [n for n in order if n in candidates]  # forward order of the layers that ran
    ranked = seen + [n for n in candidates if n not in seen]
    output = (seen or ranked or [None])[-1]  # the last layer to run feeds the loss
    out = []
    for i, name in enumerate(ranked):
        mod = modules[name]
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2 or not readable(weight):
            continue
        out.append(
            _stats(
                name,
                f"{name}.weight" if name else "weight",
                kind_of(mod),
                weight,
                getattr(mod, "bias", None),
                weight.requires_grad,
                i,
                follow.get(name),
                name == output,
                getattr(mod, "groups", 1),
                rtol,
                transposed_fans(mod) if is_transposed(mod) else None,
            )
        )
    return tuple(out)


def from_state_dict(state: dict[str, torch.Tensor], rtol: float | None) -> tuple[WeightStats, ...]:
    """Weight stats of every >= 2-D ``*.weight`` in key order; nonlinearities unknown."""
    modules: list[tuple[str, torch.Tensor]] = []
    for key, t in state.items():
        if key.endswith("weight") and isinstance(t, torch.Tensor) and readable(t):
            modules.append((key[: -len("weight")].rstrip("."), t))
    layers = [(i, name, t) for i, (name, t) in enumerate(modules) if t.ndim >= 2]
    out = []
    for rank, (i, name, t) in enumerate(layers):
        nxt = modules[i + 1][1] if i + 1 < len(modules) else None
        followed = "norm" if nxt is not None and nxt.ndim == 1 else None
        bias = state.get(f"{name}.bias" if name else "bias")
        out.append(
            _stats(
                name,
                f"{name}.weight" if name else "weight",
                "?",
                t,
                bias,
                True,
                rank,
                followed,
                rank == len(layers) - 1,
                1,
                rtol,
            )
        )
    return tuple(out)
