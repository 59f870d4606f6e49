"""Hutchinson's estimator of the Hessian trace with Rademacher probes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def hutchinson(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    probes: int = 30,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """(trace estimate, its standard error) from ``probes`` products v^T H v, v in {-1, 1}^n."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919)
    samples = []
    for _ in range(probes):
        v = (torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1).to(device)
        samples.append(float(torch.dot(v, matvec(v))))
    mean = sum(samples) / len(samples)
    if len(samples) < 2:
        return mean, math.inf
    var = sum((s - mean) ** 2 for s in samples) / (len(samples) - 1)
    return mean, math.sqrt(var / len(samples))
