"""One curvature measurement: the operator, Lanczos, and optionally the trace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nnhealth import memory
from nnhealth._util import Progress
from nnhealth.capture.stats import CurvatureStats
from nnhealth.curvature.hvp import HessianOperator, NoCurvature
from nnhealth.curvature.lanczos import LanczosResult, NonFiniteProduct, lanczos, min_basis
from nnhealth.curvature.trace import hutchinson

MEMORY_SHARE = 0.5  # of the memory available once the gradient graph is built


def available_memory(device: torch.device) -> int | None:
    """Bytes free for the Lanczos vectors on ``device`` (None: unknown, no cap): on
    the CPU the lesser of the system's MemAvailable and what the cgroup limit leaves."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    return memory.available()


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2g} GB"


def basis_cap(n: int, device: torch.device, top: int, smallest: bool, budget: int) -> int | None:
    """How many float64 Lanczos vectors of length ``n`` fit in MEMORY_SHARE of the free
    memory; NoCurvature when not even the fewest a restarted run needs do (unless the
    whole run, ``budget`` products, fits anyway)."""
    free = available_memory(device)
    if free is None:
        return None
    cap = int(MEMORY_SHARE * free) // (8 * n)
    least = min_basis(top, smallest)
    if cap < least and cap < min(budget, n) + 1:
        raise NoCurvature(
            f"not enough memory for Lanczos: {least} vectors of {n:,} float64 values need "
            f"{_gb(least * 8 * n)}, {_gb(free)} is free; free memory, lower --hessian-top, "
            "or scan on a larger machine"
        )
    return cap


def scan_lanczos(
    op: HessianOperator,
    *,
    top: int = 1,
    smallest: bool = False,
    tol: float = 1e-3,
    budget: int = 100,
    seed: int = 0,
    seeded: bool = True,
    progress: Callable[[int, float, float], None] | None = None,
) -> LanczosResult:
    """Lanczos on ``op`` as a scan runs it: the basis capped by free memory, started
    from the loss gradient (plus a random part; ``seeded=False``: random alone), a
    non-finite product reported as NoCurvature."""
    device = op.params[0].device
    try:
        return lanczos(
            op.matvec,
            op.n,
            k=top,
            smallest=smallest,
            tol=tol,
            max_iter=budget,
            seed=seed,
            start=op.gradient() if seeded else None,
            max_basis=basis_cap(op.n, device, top, smallest, budget),
            device=device,
            progress=progress,
        )
    except NonFiniteProduct as exc:
        raise NoCurvature(
            f"Hessian-vector products are not finite ({exc}): the loss's second "
            "derivatives overflow at these weights; see NH001's findings, and scan a "
            "half-precision model in float32"
        ) from exc


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
        result = scan_lanczos(
            op,
            top=top,
            smallest=smallest,
            tol=tol,
            budget=budget,
            seed=seed,
            progress=report,
        )
        lanczos_hvps = op.products
        trace = stderr = None
        if trace_probes:
            if progress is not None:
                progress(f"Hessian: trace, {trace_probes} Hutchinson probes")
            trace, stderr = hutchinson(op.matvec, op.n, trace_probes, seed, op.params[0].device)
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
