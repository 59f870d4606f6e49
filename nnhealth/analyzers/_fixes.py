"""What ``--what-if`` can apply to a copy of the model: the ``Fix`` type, what a fix
knows about the scanned model (``FixContext``), and the helpers the checks build their
fixes from (re-initialization, submodules, normalization layers, training checks).

No torch at import: ``nnhealth checks`` imports the analyzers. The helpers import it
when a fix is applied.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nnhealth.nonlinearities import Init, init_rule

if TYPE_CHECKING:
    from torch import nn

    from nnhealth.findings import Report


@dataclass(frozen=True)
class Fix:
    label: str
    # mutates the copy; returns None when applied, else why it cannot be
    apply: Callable[[nn.Module], str | None] | None = None
    # instead of a re-scan: a training check on a copy, returning (loss change before,
    # loss change after, note, whether the check confirms the fix)
    train: Callable[[nn.Module], tuple[float, float, str, bool]] | None = None


# (model, lr, old_lr, lars=False) -> (loss change at old_lr, loss change with the fix,
# note): a few full-batch steps of the scan's optimizer on ``model`` (lars: its
# layer-wise counterpart, LARS or LAMB)
Train = Callable[..., tuple[float, float, str]]


@dataclass(frozen=True)
class FixContext:
    """What the fixes need to know about the scanned model: its report's layer rows,
    the learning rate and curvature, and the optimizer's training check for training
    fixes."""

    rows: tuple[dict[str, Any], ...]
    lr: float | None
    curvature: dict[str, Any] | None
    train: Train

    @classmethod
    def of(cls, report: Report, lr: float | None, train: Train) -> FixContext:
        return cls(tuple(report.layers), lr, report.curvature, train)

    @property
    def nonlinearity(self) -> str | None:
        """The most common nonlinearity kind of the scan."""
        kinds = Counter(r["kind"] for r in self.rows if r.get("role") == "activation")
        return kinds.most_common(1)[0][0] if kinds else None

    def feeder(self, site: str) -> dict[str, Any] | None:
        """The layer (or norm layer) row just before the nonlinearity row ``site``."""
        names = [r["name"] for r in self.rows]
        if site not in names:
            return None
        before = self.rows[: names.index(site)]
        return next((r for r in reversed(before) if r.get("role") in ("layer", "norm")), None)

    def row(self, site: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["name"] == site), None)


def layer_names(model: nn.Module) -> list[str]:
    """The Linear/Conv layers a fix re-initializes, in registration order."""
    from torch import nn

    return [
        n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]


def submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(submodule(model, parent), attr, new)


def reinit(module: nn.Module, rule: Init, bias: float = 0.0) -> None:
    import torch

    with torch.no_grad():
        rule.apply(module.weight)
        if getattr(module, "bias", None) is not None:
            module.bias.fill_(bias)


def reinit_fix(label: str, module: str, rule: Init, bias: float = 0.0) -> Fix:
    """Re-initialize the layer ``module`` with ``rule`` (its bias to ``bias``)."""

    def apply(model: nn.Module) -> None:
        reinit(submodule(model, module), rule, bias)

    return Fix(label, apply)


def _all_layers(how: Callable[[nn.Module], Any]) -> Callable[[nn.Module], str | None]:
    def apply(model: nn.Module) -> str | None:
        names = layer_names(model)
        if not names:
            return "no Linear/Conv layers to change"
        for name in names:
            how(submodule(model, name))
        return None

    return apply


def _norm_after(module: nn.Module) -> nn.Module:
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](module.out_channels)
    else:
        norm = nn.LayerNorm(module.out_features)
    return nn.Sequential(module, norm.to(next(module.parameters()).device))


def _insert_norms(model: nn.Module) -> str | None:
    names = layer_names(model)[:-1]  # not after the output layer
    if not names:
        return "no hidden Linear/Conv layers"
    for name in names:
        replace_submodule(model, name, _norm_after(submodule(model, name)))
    return None


def _orthogonal(kind: str) -> Callable[[nn.Module], None]:
    def how(m: nn.Module) -> None:
        from torch import nn

        nn.init.orthogonal_(m.weight, nn.init.calculate_gain(kind))
        if m.bias is not None:
            nn.init.zeros_(m.bias)

    return how


def depth_fixes(ctx: FixContext) -> list[Fix]:
    """For a signal that shrinks or grows through depth: the init rule of the scan's
    nonlinearity on every Linear/Conv (and orthogonal init for tanh/sigmoid), or
    normalization after each hidden layer."""
    kind = ctx.nonlinearity
    rule = init_rule(kind)
    fixes = [
        Fix(f"{rule.name} on every Linear/Conv", _all_layers(lambda m: reinit(m, rule))),
    ]
    if kind in {"tanh", "sigmoid"}:
        fixes.append(Fix("orthogonal init on every Linear/Conv", _all_layers(_orthogonal(kind))))
    fixes.append(Fix("LayerNorm/BatchNorm after each hidden layer", _insert_norms))
    return fixes


def lower_lr_fix(ctx: FixContext, rate: float) -> Fix:
    """Train at ``rate`` instead of the scan's lr: confirmed when the old rate raised the
    loss and the new one lowers it."""
    old = ctx.lr

    def train(model: nn.Module) -> tuple[float, float, str, bool]:
        before, after, note = ctx.train(model, rate, old)
        return before, after, note, after < 0 < before

    return Fix(f"lr {old:g} -> {rate:.3g}", train=train)


def lars_fix(ctx: FixContext) -> Fix:
    """LARS-scaled layer rates: confirmed when they lower the loss at least as much as
    the scan's lr does."""

    def train(model: nn.Module) -> tuple[float, float, str, bool]:
        before, after, note = ctx.train(model, ctx.lr, ctx.lr, lars=True)
        return before, after, note, after < 0 and after <= before

    return Fix("layer-wise trust ratios (LARS; LAMB for Adam)", train=train)


def noise_fix(label: str, module: str, scale: float) -> Fix:
    """Add ``scale`` x the weights' spread of noise to the layer ``module``."""

    def apply(model: nn.Module) -> None:
        import torch

        layer = submodule(model, module)
        with torch.no_grad():
            spread = float(layer.weight.std()) or math.sqrt(1.0 / layer.weight.shape[1])
            layer.weight.add_(scale * spread * torch.randn_like(layer.weight))

    return Fix(label, apply)
