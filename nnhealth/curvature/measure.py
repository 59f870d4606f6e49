"""One curvature measurement: the operator, Lanczos, and optionally the trace."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nnhealth._util import Progress
from nnhealth.capture.stats import CurvatureStats
from nnhealth.curvature.hvp import HessianOperator, NoCurvature
from nnhealth.curvature.lanczos import lanczos, min_basis
from nnhealth.curvature.trace import hutchinson

MEMORY_SHARE = 0.5  # of the memory available once the gradient graph is built


def available_memory(device: torch.device) -> int | None:
    """Bytes free for the Lanczos vectors on ``device`` (None: unknown, no cap)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2g} GB"


def basis_cap(n: int, device: torch.device, top: int, smallest: bool) -> int | None:
    """How many float64 Lanczos vectors of length ``n`` fit in MEMORY_SHARE of the free
    memory; NoCurvature when not even the fewest a restarted run needs do."""
    free = available_memory(device)
    if free is None:
        return None
    cap = int(MEMORY_SHARE * free) // (8 * n)
    least = min_basis(top, smallest)
    if cap < least:
        raise NoCurvature(
            f"not enough memory for Lanczos: {least} vectors of {n:,} float64 values need "
            f"{_gb(least * 8 * n)}, {_gb(free)} is free; free memory, lower --hessian-top, "
            "or scan on a larger machine"
        )
    return cap


def measure(
    model: nn.Module,
    inputs: Any,
    make_loss: Callable[[Any], Any],
    *,
    mode: str = "train",
    seed: int = 0,
    top: int = 1,
    smallest: bool = False,
    tol: float = 1e-3,
    budget: int = 100,
    trace_probes: int = 0,
    progress: Progress | None = None,
) -> tuple[CurvatureStats, list[str]]:
    """Top-``top`` Hessian eigenvalues (and the smallest), within ``budget`` products."""

    def report(it: int, value: float, rel_bound: float) -> None:
        if progress is not None:
            progress(
                f"Hessian λmax ≈ {value:.6g}, bound {rel_bound:.1e} → {tol:.0e}",
                steps=(it, budget),
            )

    with HessianOperator(model, inputs, make_loss, mode=mode, seed=seed) as op:
        device = op.params[0].device
        cap = basis_cap(op.n, device, top, smallest)
        result = lanczos(
            op.matvec,
            op.n,
            k=top,
            smallest=smallest,
            tol=tol,
            max_iter=budget,
            seed=seed,
            start=op.gradient(),  # plus a random part: see lanczos
            max_basis=cap,
            device=device,
            progress=report,
        )
        lanczos_hvps = op.products
        trace = stderr = None
        if trace_probes:
            if progress is not None:
                progress(f"Hessian: trace, {trace_probes} Hutchinson probes")
            trace, stderr = hutchinson(op.matvec, op.n, trace_probes, seed, device)
        stats = CurvatureStats(
            top=tuple(r.value for r in result.top),
            bounds=tuple(r.residual for r in result.top),
            estimates=tuple(r.estimate for r in result.top),
            converged=result.converged,
            hvps=op.products,
            lanczos_hvps=lanczos_hvps,
            tol=tol,
            mode=mode,
            backend=op.backend,
            params=op.n,
            lambda_min=None if result.bottom is None else result.bottom.value,
            lambda_min_bound=None if result.bottom is None else result.bottom.residual,
            trace=trace,
            trace_stderr=stderr,
            trace_probes=trace_probes,
            basis_vectors=result.basis,
            restarts=result.restarts,
        )
        notes = list(op.notes)
        if result.restarts:
            notes.append(
                f"Lanczos held at most {result.basis} vectors ({_gb(result.basis * 8 * op.n)}, "
                f"half the free memory) and restarted {result.restarts} time(s): more "
                "products than an unrestarted run, the same certified bound"
            )
        return stats, notes
