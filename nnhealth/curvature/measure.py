"""One curvature measurement: the operator, Lanczos, and optionally the trace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from nnhealth._util import Progress
from nnhealth.capture.stats import CurvatureStats
from nnhealth.curvature.hvp import HessianOperator
from nnhealth.curvature.lanczos import lanczos
from nnhealth.curvature.trace import hutchinson


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
        result = lanczos(
            op.matvec,
            op.n,
            k=top,
            smallest=smallest,
            tol=tol,
            max_iter=budget,
            seed=seed,
            start=op.gradient(),  # plus a random part: see lanczos
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
        )
        return stats, list(op.notes)
