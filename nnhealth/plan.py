"""What the pass must produce: each selected check's capture request, merged.

A check states what it needs beyond its ``needs`` (``Check.request(options)``): the
saturation bounds to count against, per-unit fingerprints, the tolerance that groups
duplicate weight rows, whether the Hessian is measured. ``make_plan`` merges the
selected checks' needs and requests, with the scan's options, into one ``Plan``; the
runner runs the pass it describes and the capture computes what it switches on, nothing
more. No module outside ``analyzers/`` names a check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nnhealth.analyzers.base import Check
    from nnhealth.options import ScanOptions


@dataclass(frozen=True)
class Request:
    """One check's needs from the pass, beyond weights/activations/gradients."""

    # per unit of each ReLU-family nonlinearity: was it ever active on the batch
    dead_units: bool = False
    # count nonlinearity outputs whose derivative is below this fraction of its peak
    saturation_derivative: float | None = None
    # per-unit fingerprints of each nonlinearity's outputs over the batch
    fingerprints: bool = False
    # group weight rows equal within this relative tolerance (duplicate units)
    symmetry_rtol: float | None = None
    # the Hessian's extreme eigenvalues (and trace), by Lanczos
    curvature: bool = False

    def merge(self, other: Request) -> Request:
        """Both requests in one. A count or grouping is taken once per pass, so two
        different values of one threshold cannot both be met: ValueError."""
        merged: dict[str, Any] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, bool):
                merged[f.name] = mine or theirs
            elif mine is None or theirs is None or mine == theirs:
                merged[f.name] = theirs if mine is None else mine
            else:
                raise ValueError(f"conflicting capture requests: {f.name} {mine} and {theirs}")
        return Request(**merged)


@dataclass(frozen=True)
class Hessian:
    """How the Hessian is measured (ScanOptions' hessian_* options), when it is."""

    top: int = 1
    smallest: bool = False
    trace_probes: int = 0
    tol: float = 1e-2
    budget: int = 100
    # on the batch's first ``examples`` (None: the whole batch, or batch // batches), in
    # ``batches`` disjoint sub-batches of that size
    examples: int | None = None
    batches: int = 1


@dataclass(frozen=True)
class Plan:
    """The pass the selected checks need, and nothing more.

    The defaults describe a pass with activations and gradients but none of the
    optional statistics (saturation counts, fingerprints, weight groups, curvature).
    """

    activations: bool = True  # per-site moments of every layer and nonlinearity
    gradients: bool = True  # the backward pass: gradient moments per site, grad norms
    # run the model on the batch at all (False: weights only, no forward)
    forward: bool = True
    dead_units: bool = False  # whether each ReLU-family unit was ever active
    # count saturated values against bounds at this derivative fraction (None: no counts)
    saturation_derivative: float | None = None
    fingerprints: bool = False  # per-unit fingerprints of nonlinearity outputs
    symmetry_rtol: float | None = None  # group duplicate weight rows (None: no grouping)
    curvature: Hessian | None = None  # measure the Hessian this way (None: not measured)
    mode: str = "train"
    seed: int = 0
    # the scan's optimizer (optim.Optimizer): each parameter's update, the Hessian's
    # preconditioner; None: no update norms
    optimizer: Any = field(default=None, compare=False)


def is_opt_in(check: type[Check]) -> bool:
    """A check that asks for the Hessian with its default options is expensive: it runs
    only when selected by name or when the scan asks for the Hessian."""
    return check.request(check.defaults()).curvature


def make_plan(
    checks: Iterable[tuple[type[Check], dict[str, Any]]], opts: ScanOptions, optimizer: Any = None
) -> Plan:
    """The plan for ``checks`` (each with its resolved options) under ``opts``.

    ``opts.hessian`` False keeps the Hessian unmeasured even when a check asks for it
    (the check is then skipped with the reason).
    """
    needs: set[str] = set()
    request = Request()
    for check, options in checks:
        needs |= check.needs | check.uses
        request = request.merge(check.request(options))
    hessian = None
    if request.curvature and opts.hessian is not False:
        hessian = Hessian(
            top=opts.hessian_top,
            smallest=opts.hessian_min,
            trace_probes=opts.hessian_trace,
            tol=opts.hessian_tol,
            budget=opts.hessian_budget,
            examples=opts.hessian_batch,
            batches=opts.hessian_batches,
        )
    return Plan(
        activations="activations" in needs,
        gradients="gradients" in needs,
        forward=bool(needs - {"weights", "modules"}),
        dead_units=request.dead_units,
        saturation_derivative=request.saturation_derivative,
        fingerprints=request.fingerprints,
        symmetry_rtol=request.symmetry_rtol,
        curvature=hessian,
        mode=opts.mode,
        seed=opts.seed,
        optimizer=optimizer,
    )
