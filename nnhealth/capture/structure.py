"""What kind of module is this: normalization, channel-first, a nonlinearity."""

from __future__ import annotations

from torch import nn

_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)
_CHANNEL_FIRST_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES)


def is_activation_module(module: nn.Module) -> bool:
    """nn.ReLU, nn.PReLU, nn.GELU...: a nonlinearity written as a module."""
    return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(
        module, nn.MultiheadAttention
    )
