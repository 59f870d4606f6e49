"""The registry of checks. Codes and names are a contract: stable, never reused."""

from __future__ import annotations

from nnhealth.analyzers.activation_variance import ActivationVariance
from nnhealth.analyzers.base import Check, Option
from nnhealth.analyzers.curvature import Curvature
from nnhealth.analyzers.dead_relu import DeadRelu
from nnhealth.analyzers.gradient_variance import GradientVariance
from nnhealth.analyzers.init_scale import InitScale
from nnhealth.analyzers.nonfinite import Nonfinite
from nnhealth.analyzers.norm_ratio import NormRatio
from nnhealth.analyzers.saturation import Saturation
from nnhealth.analyzers.symmetry import Symmetry

REGISTRY: tuple[type[Check], ...] = (
    Nonfinite,
    DeadRelu,
    Saturation,
    ActivationVariance,
    GradientVariance,
    NormRatio,
    Curvature,
    Symmetry,
    InitScale,
)

__all__ = ["REGISTRY", "Check", "Option", "lookup", "select_checks"]


def lookup(code_or_name: str) -> type[Check] | None:
    key = code_or_name.strip()
    for check in REGISTRY:
        if key.upper() == check.code or key.lower() == check.name:
            return check
    return None


def _matches(token: str) -> list[type[Check]]:
    token = token.strip()
    if not token:
        return []
    exact = lookup(token)
    if exact is not None:
        return [exact]
    if token.upper() == "ALL":
        return list(REGISTRY)
    # ruff-style prefixes: NH1 selects NH101, NH102
    prefix = [
        c for c in REGISTRY if token.upper().startswith("NH") and c.code.startswith(token.upper())
    ]
    if prefix:
        return prefix
    raise ValueError(
        f"unknown check {token!r}: use a code (NH101), a code prefix (NH1) or a name "
        "(dead-relu); `nnhealth checks` lists them"
    )


def select_checks(select: list[str] | None, ignore: list[str] | None) -> list[type[Check]]:
    """The checks to run, in registry order. Raises ValueError on an unknown token."""
    chosen = set(REGISTRY) if not select else {c for t in select for c in _matches(t)}
    for token in ignore or []:
        chosen -= set(_matches(token))
    return [c for c in REGISTRY if c in chosen]
