"""What kind of module is this: normalization, channel-first, a nonlinearity."""

from __future__ import annotations

import re

from torch import nn

from nnhealth.nonlinearities import module_kind

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


# other libraries' own normalization classes (LlamaRMSNorm, T5LayerNorm, MistralRMSNorm,
# timm's LayerNorm2d...), recognized by name without importing them
_NORM_NAME = re.compile(r"(Batch|Layer|Group|RMS|Instance)Norm(\d+d)?$")


def is_norm_name(class_name: str) -> bool:
    """A normalization layer's class name (BatchNorm2d, LayerNorm, LlamaRMSNorm...)."""
    return bool(_NORM_NAME.search(class_name))


def is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM_TYPES):
        return True
    return is_norm_name(type(module).__name__) and not any(True for _ in module.children())


def is_torch_activation(module: nn.Module) -> bool:
    """nn.ReLU, nn.PReLU, nn.Softmax...: torch.nn's activation modules."""
    return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(
        module, nn.MultiheadAttention
    )


def activation_kind(module: nn.Module) -> str | None:
    """The nonlinearity a module computes, by its class name (torch.nn's, HF's GELU
    variants, timm's activation layers...); None for a module with submodules."""
    if next(module.children(), None) is not None:
        return None
    return module_kind(type(module).__name__)


def is_activation_module(module: nn.Module) -> bool:
    """A nonlinearity written as a module: torch.nn's, or one classified by its name."""
    return is_torch_activation(module) or activation_kind(module) is not None
