"""One curvature measurement: the operator (exact products, or finite differences of
gradients when the double backward cannot be had or trusted), Lanczos, and optionally
the trace."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nnhealth import distributed, memory
from nnhealth._util import Progress, out_of_memory
from nnhealth.curvature import trust, vectors
from nnhealth.curvature.blocks import BlockedHessianOperator, Examples, graph_limit
from nnhealth.curvature.finite import MAX_ERROR, FiniteDifferenceOperator, product_error
from nnhealth.curvature.hvp import HessianOperator, NoCurvature, NoSecondDerivative
from nnhealth.curvature.lanczos import (
    LanczosResult,
    NonFiniteProduct,
    lanczos,
    min_basis,
    start_vector,
)
from nnhealth.curvature.preconditioned import Preconditioned
from nnhealth.curvature.stats import FINITE, MeasuredCurvature
from nnhealth.curvature.threeterm import lanczos_three_term
from nnhealth.curvature.trace import hutchinson
from nnhealth.errors import flag, report_text

if TYPE_CHECKING:
    from nnhealth.plan import Plan

Operator = HessianOperator | FiniteDifferenceOperator | Preconditioned
# wraps an operator into the one to measure (the optimizer's preconditioned Hessian)
Wrap = Callable[[Any], Any]

MEMORY_SHARE = 0.5  # of the memory available once the gradient graph is built
# The most a stored Lanczos basis may take. The three-term variant (threeterm.py) gives
# the same extreme eigenvalues, with the same certified bound, in about as many products
# from three vectors, so a basis is held only when it is small in absolute terms: 1 GB
# holds a whole default run (101 vectors) for up to 2.6M float32 parameters (1.3M
# float64), and never more than one vector of a 250M-parameter model. ViT-B/16 (86M)
# and GPT-2 small (124M) would need 35 and 50 GB: they run on three vectors.
BASIS_LIMIT = 1 << 30
# vectors of the three-term run at its peak: three, and the product being taken (the
# symmetry test before it holds five: the start vector, its product, a random vector,
# its product, and the one being taken)
THREE_TERM_PEAK = 5


def available_memory(device: torch.device) -> int | None:
    """Bytes free for the Lanczos vectors on ``device`` (None: unknown, no cap): on
    the CPU the lesser of the system's MemAvailable and what the cgroup limit leaves;
    across ranks the least of theirs, so that every rank chooses the same Lanczos (the
    products are collectives: ranks running different ones would stop matching)."""
    free = memory.free_on(device)
    ranks = distributed.current()
    if free is None or ranks is None:
        return free
    return distributed.smallest(free, ranks)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2g} GB"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def basis_cap(
    n: int,
    device: torch.device,
    top: int,
    smallest: bool,
    budget: int,
    dtype: torch.dtype = torch.float64,
) -> int | None:
    """How many Lanczos vectors of length ``n`` (in ``dtype``) fit in MEMORY_SHARE of
    the free memory; NoCurvature when not even the fewest a restarted run needs do
    (unless the whole run, ``budget`` products, fits anyway)."""
    free = available_memory(device)
    if free is None:
        return None
    size = dtype.itemsize * n
    cap = int(MEMORY_SHARE * free) // size
    least = min_basis(top, smallest)
    if cap < least and cap < min(budget, n) + 1:
        raise NoCurvature(
            f"not enough memory for Lanczos: {least} vectors of {n:,} {_dtype_name(dtype)} "
            f"values need {_gb(least * size)}, {_gb(free)} is free; free memory, lower "
            f"{flag('hessian_top')}, "
            "or scan on a larger machine"
        )
    return cap


@dataclass(frozen=True)
class Choice:
    """Which Lanczos runs: a stored basis (``cap`` vectors at most, None: the whole run)
    or three vectors; ``note`` says why when it is not the plain stored basis."""

    three_term: bool
    cap: int | None
    note: str | None


def choose(
    n: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    top: int,
    smallest: bool,
    budget: int,
    vector: bool,
    variant: str | None = None,
) -> Choice:
    """A stored basis when the whole run fits in the lesser of BASIS_LIMIT and
    MEMORY_SHARE of the free memory, or when the top Ritz vector is wanted (restarted
    under the memory cap: basis_cap); else three vectors; NoCurvature (before any
    product) when not even those fit. ``variant`` ("full", "three-term") forces one
    (benchmarks; the top Ritz vector always takes the stored basis)."""
    free = available_memory(device)
    allowed = BASIS_LIMIT if free is None else min(BASIS_LIMIT, int(MEMORY_SHARE * free))
    size = dtype.itemsize * n
    whole = (min(budget, n) + 1) * size
    if vector or variant == "full":
        return Choice(False, basis_cap(n, device, top, smallest, budget, dtype), None)
    if whole <= allowed and variant is None:
        return Choice(False, None, None)
    if free is not None and THREE_TERM_PEAK * size > free:
        raise NoCurvature(
            f"not enough memory for Lanczos: even without a stored basis it holds "
            f"{THREE_TERM_PEAK} vectors of {n:,} {_dtype_name(dtype)} values "
            f"({_gb(THREE_TERM_PEAK * size)}) and {_gb(free)} is free; free memory, scan on a "
            f"larger machine, or leave out {flag('hessian')}"
        )
    return Choice(
        True,
        None,
        f"Lanczos without a stored basis (3 {_dtype_name(dtype)} vectors, {_gb(3 * size)}): "
        f"the basis for {min(budget, n)} products would need {_gb(whole)}, over the "
        f"{_gb(allowed)} a basis may take (the lesser of {_gb(BASIS_LIMIT)} and half the "
        "free memory)",
    )


def scan_lanczos(
    op: Operator,
    *,
    top: int = 1,
    smallest: bool = False,
    tol: float = 1e-2,
    budget: int = 100,
    seed: int = 0,
    seeded: bool = True,
    progress: Callable[[int, float, float], None] | None = None,
    vector: bool = False,
    notes: list[str] | None = None,
    variant: str | None = None,
) -> LanczosResult:
    """Lanczos on ``op`` as a scan runs it: a stored basis or three vectors as memory
    allows (choose(); ``notes`` gets why), started from the loss gradient (plus a random
    part; ``seeded=False``: random alone), after the operator passed the symmetry test
    (trust.py: two products beyond Lanczos's, three when rounding must be measured;
    Lanczos reuses the test's product of its start vector). Vectors are stored in the
    parameters' dtype (at least float32). A non-finite product or running out of memory
    is reported as NoCurvature, an asymmetric operator as NoSecondDerivative.
    ``vector``: keep the top Ritz vector (a stored basis then); ``variant``: force one
    (choose())."""
    device = op.params[0].device
    dtype = vectors.storage_dtype([p.dtype for p in op.params])
    choice = choose(
        op.n,
        device,
        dtype,
        top=top,
        smallest=smallest,
        budget=budget,
        vector=vector,
        variant=variant,
    )  # refuses before any product
    if notes is not None and choice.note:
        notes.append(choice.note)
    try:
        first = _first(op, seed, seeded, dtype, device)
        common: dict[str, Any] = {
            "k": top,
            "smallest": smallest,
            "tol": tol,
            "max_iter": budget,
            "seed": seed,
        }
        if choice.three_term:
            return lanczos_three_term(
                op.matvec,
                op.n,
                **common,
                device=device,
                progress=progress,
                dtype=dtype,
                first=first,
            )
        return lanczos(
            op.matvec,
            op.n,
            **common,
            max_basis=choice.cap,
            device=device,
            progress=progress,
            vector=vector,
            dtype=dtype,
            first=first,
        )
    except NonFiniteProduct as exc:
        raise NoCurvature(
            f"Hessian-vector products are not finite ({exc}): the loss's second "
            "derivatives overflow at these weights; see NH001's findings, and scan a "
            "half-precision model in float32"
        ) from exc
    except (MemoryError, RuntimeError) as exc:  # the basis, or the vectors of the test
        if not out_of_memory(exc):
            raise
        raise NoCurvature(trust.oom_reason("during Lanczos", exc)) from exc


def _first(
    op: Operator, seed: int, seeded: bool, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Lanczos's first vector and its product, after the symmetry test (which reuses
    that product): a list Lanczos takes over (empties), so nothing else holds them."""
    start = op.gradient() if seeded else None
    q0 = start_vector(op.n, start, torch.Generator(device="cpu").manual_seed(seed), device, dtype)
    del start
    hq0 = op.matvec(q0).to(dtype)
    if not bool(torch.isfinite(hq0).all()):
        raise NonFiniteProduct("product 1 of the operator is not finite")
    sym = trust.check_symmetry(
        op.matvec,
        op.n,
        q0,
        hq0,
        dtypes=[p.dtype for p in op.params],
        seed=seed,
        floor=op.asymmetry_floor,
    )
    if not sym.symmetric:
        raise NoSecondDerivative(trust.asymmetry_reason(sym, op.functions))
    return [q0, hq0]


@dataclass(frozen=True)
class Settings:
    """What to measure: measure()'s keyword arguments after the operator's."""

    top: int = 1
    smallest: bool = False
    tol: float = 1e-2
    budget: int = 100
    trace_probes: int = 0
    seed: int = 0


def measure(
    model: nn.Module,
    inputs: Any,
    make_loss: Callable[[Any], Any],
    *,
    mode: str = "train",
    seed: int = 0,
    top: int = 1,
    smallest: bool = False,
    tol: float = 1e-2,
    budget: int = 100,
    trace_probes: int = 0,
    progress: Progress | None = None,
    wrap: Wrap | None = None,
    examples: Examples | None = None,
) -> tuple[MeasuredCurvature, list[str]]:
    """Top-``top`` Hessian eigenvalues (and the smallest), within ``budget`` products:
    by exact products (double backward), or, when those cannot be had or trusted, by
    finite differences of gradients (an estimate, with its error bar). ``wrap(op)``:
    the operator to measure instead (the optimizer's preconditioned Hessian).
    ``examples``: the batch as blocks can be cut from it, for exact products in
    bounded memory (blocks.py); None: one graph of the whole batch, kept."""
    wrap = wrap or (lambda op: op)
    settings = Settings(top, smallest, tol, budget, trace_probes, seed)
    try:
        with _exact(model, inputs, make_loss, examples, mode, seed) as op:
            return _measured(wrap(op), settings, progress)
    except NoSecondDerivative as exc:
        why = exc.message
    if progress is not None:
        progress("Hessian: no double backward here, finite differences of gradients")
    try:
        with FiniteDifferenceOperator(model, inputs, make_loss, mode=mode, seed=seed) as op:
            stats, notes = _measured(wrap(op), settings, progress)
    except NoCurvature as exc:
        raise NoCurvature(
            f"{why}; Hessian-vector products by finite differences of gradients failed too: "
            f"{exc.message}"
        ) from exc
    head = (
        f"no exact Hessian-vector products here ({why}): NH401 took them by central "
        f"differences of gradients (two forward+backward passes each, step "
        f"{stats.hvp_step:.2g}), estimated relative error {stats.hvp_error:.1g}, lambda_max "
        f"± {stats.lambda_max_error:.2g}: an estimate, not certified"
    )
    return stats, [head, *notes]


def _exact(
    model: nn.Module,
    inputs: Any,
    make_loss: Callable[[Any], Any],
    examples: Examples | None,
    mode: str,
    seed: int,
) -> HessianOperator:
    """The double-backward operator: on blocks of ``examples`` when given (the graph
    kept whole when it fits its allowance, graph_limit), else on the whole batch."""
    if examples is None:
        return HessianOperator(model, inputs, make_loss, mode=mode, seed=seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    limit = graph_limit(
        sum(p.numel() for p in trainable),
        trainable[0].device if trainable else torch.device("cpu"),
    )
    return BlockedHessianOperator(model, inputs, make_loss, examples, limit, mode=mode, seed=seed)


def _measured(
    op: Operator,
    settings: Settings,
    progress: Progress | None,
) -> tuple[MeasuredCurvature, list[str]]:
    """Lanczos (and the trace) on ``op``; for finite differences, the products' error
    measured at the top Ritz vector."""
    tol, budget = settings.tol, settings.budget

    def report(it: int, value: float, rel_bound: float) -> None:
        if progress is not None:
            progress(
                f"Hessian λmax ≈ {value:.6g}, bound {rel_bound:.1e} → {tol:.0e}",
                steps=(it, budget),
            )

    inner = op.inner if isinstance(op, Preconditioned) else op
    finite = isinstance(inner, FiniteDifferenceOperator)
    chosen: list[str] = []
    result = scan_lanczos(
        op,
        top=settings.top,
        smallest=settings.smallest,
        tol=tol,
        budget=budget,
        seed=settings.seed,
        progress=report,
        vector=finite,
        notes=chosen,
    )
    notes = [*op.notes, *chosen]  # op.notes after the products (math attention, ...)
    lanczos_hvps = result.iterations  # the symmetry test's products are in hvps only
    how: dict[str, Any] = {"lambda_max_error": result.top[0].residual}
    if finite and result.top_vector is not None:
        # the products' error is the wrapped operator's, taken where D maps the vector
        at = op.lift(result.top_vector) if inner is not op else result.top_vector
        error, size = product_error(inner, at)
        if not error <= MAX_ERROR * size:
            raise NoCurvature(
                f"finite differences of gradients do not settle at the top eigenvector: "
                f"products there change by {error / size if size else math.inf:.2g} of "
                "their size between steps (the loss has kinks within the step: ReLU units "
                "at zero, a normalization over very few values; try a larger batch or "
                f"{flag('mode')} eval)"
            )
        how = {
            "hvp": FINITE,
            "hvp_step": inner.step(at),
            "hvp_error": error / size if size else math.inf,
            "lambda_max_error": result.top[0].residual
            + (error if inner is op else error / size * abs(result.top[0].value)),
        }
    trace, stderr = _trace(op, settings, progress) if settings.trace_probes else (None, None)
    stats = MeasuredCurvature(
        top=tuple(r.value for r in result.top),
        bounds=tuple(r.residual for r in result.top),
        estimates=tuple(r.estimate for r in result.top),
        converged=result.converged,
        hvps=op.products,
        lanczos_hvps=lanczos_hvps,
        tol=tol,
        mode=op.mode,
        backend=op.backend,
        params=op.n,
        lambda_min=None if result.bottom is None else result.bottom.value,
        lambda_min_bound=None if result.bottom is None else result.bottom.residual,
        trace=trace,
        trace_stderr=stderr,
        trace_probes=settings.trace_probes,
        basis_vectors=result.basis,
        restarts=result.restarts,
        lanczos=result.variant,
        basis_dtype=_dtype_name(result.dtype),
        blocks=getattr(inner, "blocks", 1),
        **how,
    )
    if result.restarts:
        notes.append(_restart_note(result, op.n))
    return stats, notes


def _restart_note(result: LanczosResult, n: int) -> str:
    size = result.basis * result.dtype.itemsize * n
    return (
        f"Lanczos held at most {result.basis} {_dtype_name(result.dtype)} vectors "
        f"({_gb(size)}, half the free memory) and restarted {result.restarts} time(s): "
        "more products than an unrestarted run, the same bound"
    )


def _trace(op: Operator, settings: Settings, progress: Progress | None) -> tuple[float, float]:
    if progress is not None:
        progress(f"Hessian: trace, {settings.trace_probes} Hutchinson probes")
    try:
        return hutchinson(
            op.matvec, op.n, settings.trace_probes, settings.seed, op.params[0].device
        )
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        raise NoCurvature(trust.oom_reason("during the Hessian trace", exc)) from exc


def measure_planned(
    model: nn.Module,
    inputs: Any,
    make_loss: Callable[[Any], Any],
    plan: Plan,
    progress: Progress | None = None,
    wrap: Wrap | None = None,
    examples: Examples | None = None,
) -> tuple[MeasuredCurvature | None, str | None, list[str]]:
    """The Hessian measured as ``plan`` says: (stats, None, notes); or (None, the reason,
    []) when there is none to measure or trust here, or the plan measures none."""
    hessian = plan.curvature
    if hessian is None:
        return None, None, []
    try:
        stats, notes = measure(
            model,
            inputs,
            make_loss,
            mode=plan.mode,
            seed=plan.seed,
            top=hessian.top,
            smallest=hessian.smallest,
            tol=hessian.tol,
            budget=hessian.budget,
            trace_probes=hessian.trace_probes,
            progress=progress,
            wrap=wrap,
            examples=examples,
        )
    except NoCurvature as exc:
        return None, report_text(exc.message), []
    return stats, None, notes
