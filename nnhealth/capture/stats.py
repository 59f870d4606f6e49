"""Frozen results of the instrumented pass: small per-layer numbers, no tensors.

Everything here is numpy or plain Python so the analyzers never need torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nnhealth.nonlinearities import hard_slope

# Site roles: a parametric layer's output (Linear, Conv, Embedding...), a normalization
# layer's output (BatchNorm, LayerNorm...), or a nonlinearity's output.
LAYER = "layer"
NORM = "norm"
ACTIVATION = "activation"


@dataclass(frozen=True)
class ActivationSpec:
    """How one nonlinearity is judged: may it die (ReLU family), where does it saturate."""

    kind: str
    can_die: bool = False
    # saturated when y <= sat_lo or y >= sat_hi (None: no such bound)
    sat_lo: float | None = None
    sat_hi: float | None = None
    # derivative formula from the output, for the mean-derivative statistic
    derivative: str | None = None  # "sigmoid" | "tanh" | "hard" | None


@dataclass(frozen=True)
class SiteStats:
    """Statistics of one call of one layer or nonlinearity in the forward pass.

    A unit is the channel dimension for convolutions, the last dimension otherwise;
    ``per_unit_count`` values went into each unit. Moments are over every element;
    per-unit arrays (ever active, saturation counts) are kept for nonlinearities.
    Each statistic comes from one reducer (reducers.py) that the plan switched on; the
    fields of a statistic the selected checks did not ask for keep their defaults.
    """

    name: str
    module: str
    kind: str
    role: str
    functional: bool
    order: int
    shape: tuple[int, ...]
    unit_dim: int
    examples: int
    units: int
    per_unit_count: int
    mean: float  # over every element of the output
    var: float  # population variance over every element
    nonfinite: int
    # per unit, for nonlinearity outputs only
    ever_active: np.ndarray | None = None  # ReLU family: did the unit ever output > 0
    saturated_count: np.ndarray | None = None
    # per unit: (two random zero-sum projections of its outputs over the batch, min, max);
    # units with equal fingerprints computed the same function of this batch
    unit_fingerprint: np.ndarray | None = None
    # per unit, with the fingerprint: values strictly between the unit's min and max (the
    # values that can tell two units apart; a ReLU's zeros and a saturated unit's bound
    # are shared by chance); counted only for units with a near twin, -1 elsewhere
    unit_interior: np.ndarray | None = None
    spec: ActivationSpec | None = None
    positive_fraction: float | None = None  # ReLU6-like: share of values above the flat 0
    is_output: bool = False  # its output is the model's output (it feeds the loss)
    grad_count: int = 0
    grad_mean: float | None = None
    grad_m2: float | None = None
    grad_nonfinite: int = 0
    grad_order: int | None = None
    dtype: str = "float32"  # the output's dtype (statistics are in float32 whatever it is)
    # a layer or norm module: the site whose output it took as its first input (same
    # storage), None when it read something no site produced (a sum, the model's input)
    reads: str | None = None
    # its relative spacing (2**-mantissa bits): bfloat16 0.0078, float16 0.00098
    eps: float = 2.0**-23

    @property
    def total(self) -> int:
        return self.units * self.per_unit_count

    @property
    def second_moment(self) -> float:
        """E[y^2] over every element."""
        return self.var + self.mean**2

    @property
    def grad_var(self) -> float | None:
        if self.grad_m2 is None or not self.grad_count:
            return None
        return float(self.grad_m2 / self.grad_count)

    @property
    def dead_units(self) -> int | None:
        if self.ever_active is None:
            return None
        return int((~self.ever_active).sum())

    def saturated_units(self, unit_fraction: float) -> int | None:
        """Units that sit in the saturated region for at least ``unit_fraction`` of values."""
        if self.saturated_count is None:
            return None
        return int((self.saturated_count >= unit_fraction * self.per_unit_count).sum())

    @property
    def saturated_fraction_values(self) -> float | None:
        if self.saturated_count is None:
            return None
        return float(self.saturated_count.sum() / self.total)

    @property
    def mean_derivative(self) -> float | None:
        """Mean derivative of the nonlinearity, from its output moments (sigmoid, tanh)."""
        if self.spec is None or self.spec.derivative is None:
            return None
        if self.spec.derivative == "sigmoid":  # s' = s(1 - s)
            return self.mean - self.second_moment
        if self.spec.derivative == "tanh":  # t' = 1 - t^2
            return 1.0 - self.second_moment
        if self.spec.derivative == "hard" and self.saturated_count is not None:
            # piecewise linear: slope `peak` between the flat parts, 0 on them
            linear = (
                self.positive_fraction if self.positive_fraction is not None else 1.0
            ) - self.saturated_count.sum() / self.total
            return float(max(linear, 0.0) * hard_slope(self.spec.kind))
        return None


@dataclass(frozen=True)
class ParamStats:
    """One parameter tensor: its norms, and the gradient's when one was computed."""

    name: str
    module: str
    kind: str  # module type name, e.g. "Linear"
    role: str  # "weight" (matrices/filters), "bias", "norm" (norm-layer affine), "other"
    shape: tuple[int, ...]
    trainable: bool
    norm: float
    nonfinite: int
    grad_norm: float | None = None
    grad_nonfinite: int = 0
    # ||the change one step of the scan's optimizer makes now|| (None: no lr, no gradient)
    update_norm: float | None = None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass(frozen=True)
class WeightStats:
    """One layer's weight matrix (Linear rows, Conv filters): scale and duplicate units.

    ``groups`` holds the units (rows, with their bias) that are identical within the
    symmetry tolerance, as index lists of size >= 2. ``followed_by`` is what the layer's
    output goes through next: a nonlinearity kind ("relu", "tanh"...), "norm" (a
    normalization layer), "none" (another layer or the output), or None (unknown).
    """

    module: str
    param: str
    kind: str
    shape: tuple[int, ...]
    fan_in: int | float  # a transposed convolution's is in/groups x prod(k) / prod(stride)
    fan_out: int
    mean: float
    var: float
    trainable: bool
    order: int
    followed_by: str | None
    is_output: bool
    groups: tuple[tuple[int, ...], ...] = ()
    groups_exact: bool = True
    dtype: str = "float32"  # as stored; mean and var are computed in float64 whatever it is
    # pairs of units expected to be equal by chance if the layer were randomly initialized
    # at its own scale and stored in ``dtype`` (float8 rows of a few inputs collide often)
    chance_pairs: float = 0.0
    # output units (0: the weight's first dim; a transposed convolution's: dim 1 x groups)
    unit_count: int = 0

    @property
    def units(self) -> int:
        return self.unit_count or self.shape[0]

    @property
    def duplicated(self) -> int:
        """Units that duplicate another: the width lost to symmetry."""
        return sum(len(g) - 1 for g in self.groups)

    @property
    def effective_width(self) -> int:
        return self.units - self.duplicated


@dataclass(frozen=True)
class GateStats:
    """One gate of one layer and direction of a recurrent module (LSTM i/f/g/o, GRU
    r/z/n), over every example and step of the pass: how many values sit at or below
    ``lo`` and at or above ``hi`` (the saturation bounds of its function), and the sums
    of the values and of their pre-activations."""

    module: str
    kind: str  # "LSTM", "GRU", "LSTMCell", "GRUCell"
    layer: int
    direction: int  # 1: the reverse direction of a bidirectional module
    gate: str  # "input", "forget", "cell", "output"; "reset", "update", "new"
    function: str  # "sigmoid" or "tanh"
    chunk: int  # its block of rows in weight_ih/bias_ih (torch's gate order)
    values: int
    below: int
    above: int
    lo: float
    hi: float
    total: float
    pre_total: float
    pre_squares: float

    @property
    def mean(self) -> float:
        return self.total / self.values if self.values else 0.0

    @property
    def pre_mean(self) -> float:
        return self.pre_total / self.values if self.values else 0.0

    @property
    def pre_std(self) -> float:
        if not self.values:
            return 0.0
        return max(self.pre_squares / self.values - self.pre_mean**2, 0.0) ** 0.5

    @property
    def suffix(self) -> str:
        """Its parameters' suffix: "_l0", "_l1_reverse"; "" for a cell."""
        if self.kind.endswith("Cell"):
            return ""
        return f"_l{self.layer}" + ("_reverse" if self.direction else "")


@dataclass(frozen=True)
class CurvatureStats:
    """The Hessian's extreme eigenvalues (Lanczos) and optionally its trace (Hutchinson)."""

    top: tuple[float, ...]  # largest first
    bounds: tuple[float, ...]  # certified error bound of each (the Ritz residual)
    estimates: tuple[float, ...]  # residual^2 / Ritz gap: usually nearer the true error
    converged: bool
    hvps: int  # Hessian-vector products in all (Lanczos + trace)
    lanczos_hvps: int
    tol: float
    mode: str
    backend: str
    params: int
    lambda_min: float | None = None
    lambda_min_bound: float | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    trace_probes: int = 0
    basis_vectors: int = 0  # the most Lanczos vectors held at once
    restarts: int = 0  # thick restarts forced by the memory cap
    # which Lanczos ran: "full" (a stored basis, fully reorthogonalized) or "three-term"
    # (no stored basis: three vectors, spurious copies screened); the basis's dtype
    lanczos: str = "full"
    basis_dtype: str = "float64"
    # the examples the Hessian was taken on (a sub-batch: --hessian-batch), and with
    # --hessian-batches K, each sub-batch's lambda_max (``top[0]`` is then their mean)
    examples: int | None = None
    batches: int = 1
    batch_lambda_max: tuple[float, ...] = ()
    ranks: int = 1  # processes whose products were averaged (torch.distributed)
    # blocks of the batch each product was rebuilt in (curvature/blocks.py); 1: the
    # whole batch's graph, built once and kept across products
    blocks: int = 1
    # the optimizer's: lr < limit_factor / lambda_max is stable on the quadratic model;
    # "hessian", or "preconditioned" (the eigenvalues are of P^-1 H) and how P was had
    limit_factor: float = 2.0
    suggest_factor: float = 1.0  # the rate to suggest is suggest_factor / lambda_max
    operator: str = "hessian"
    preconditioner: str | None = None
    optimizer: str = "SGD"

    @property
    def lambda_max(self) -> float:
        return self.top[0]

    @property
    def lr_limit(self) -> float | None:
        """limit_factor / lambda_max (2 / lambda_max for SGD): the optimizer diverges
        along the top eigenvector above it."""
        return self.limit_factor / self.lambda_max if self.lambda_max > 0 else None

    @property
    def suggested_lr(self) -> float | None:
        """The rate to suggest below the limit (1/lambda_max for SGD)."""
        return self.suggest_factor / self.lambda_max if self.lambda_max > 0 else None

    def to_dict(self) -> dict:
        return {
            "top_eigenvalues": list(self.top),
            "bounds": list(self.bounds),
            "error_estimates": list(self.estimates),
            "hvps": self.hvps,
            "lanczos_hvps": self.lanczos_hvps,
            "converged": self.converged,
            "tol": self.tol,
            "lr_limit": self.lr_limit,
            "lambda_min": self.lambda_min,
            "lambda_min_bound": self.lambda_min_bound,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "trace_probes": self.trace_probes,
            "mode": self.mode,
            "backend": self.backend,
            "params": self.params,
            "basis_vectors": self.basis_vectors,
            "restarts": self.restarts,
            "lanczos": self.lanczos,
            "basis_dtype": self.basis_dtype,
            "examples": self.examples,
            "batches": self.batches,
            "batch_lambda_max": list(self.batch_lambda_max),
            "ranks": self.ranks,
            "blocks": self.blocks,
            "optimizer": self.optimizer,
            "operator": self.operator,
            "preconditioner": self.preconditioner,
            "limit_factor": self.limit_factor,
            "suggested_lr": self.suggested_lr,
        }


@dataclass(frozen=True)
class Capture:
    """What the one instrumented pass saw."""

    sites: tuple[SiteStats, ...]
    params: tuple[ParamStats, ...]
    has_activations: bool
    has_gradients: bool
    loss: float | None
    mode: str | None
    examples: int | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    # why activations/gradients are missing, for the "skipped" entries
    missing_reason: str | None = None
    # per weight matrix, in depth order (filled after the pass, or from a state_dict)
    weights: tuple[WeightStats, ...] = ()
    curvature: CurvatureStats | None = None
    curvature_reason: str | None = None  # why no curvature was measured, when asked for
    # which module each parameter belongs to is known (False: a bare state_dict)
    has_modules: bool = True
    # the gates of recurrent modules (LSTM, GRU), when saturation counts were asked for
    gates: tuple[GateStats, ...] = ()
    # the scan's optimizer as optim.Optimizer.summary() gives it (kind, name, lr, limit)
    optimizer: dict | None = None

    def activation_sites(self) -> list[SiteStats]:
        return [s for s in self.sites if s.role == ACTIVATION]

    def layer_sites(self) -> list[SiteStats]:
        return [s for s in self.sites if s.role == LAYER]
