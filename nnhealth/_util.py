"""Small helpers shared across stages."""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    """Where a long stage reports: a message, and (done, total) when it has steps."""

    def __call__(self, message: str, steps: tuple[int, int] | None = None) -> None: ...


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def tensors_in(obj: Any) -> list:
    """Every tensor in a tensor / tuple / list / dict structure, depth first."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_in(item)]
    return []
