"""The scan's options: their types, defaults and validation, in one place.

No torch here: the CLI's ``--help`` and the config file read this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nnhealth.errors import UsageError
from nnhealth.findings import Severity

LOSS_NAMES = ("ce", "mse", "bce")  # loading.loss.NAMES holds what each computes

MODES = ("train", "eval")
LOSSES = ("auto", *LOSS_NAMES)


@dataclass
class ScanOptions:
    select: list[str] | None = None
    ignore: list[str] | None = None
    loss: str = "auto"
    seed: int = 0
    mode: str = "train"
    device: str | None = None
    lr: float | None = None
    hessian: bool | None = None  # None: measure curvature iff NH401 was selected explicitly
    hessian_top: int = 1
    hessian_min: bool = False
    hessian_trace: int = 0  # Hutchinson probes; 0: no trace
    hessian_tol: float = 1e-3
    hessian_budget: int = 100
    check_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    severities: dict[str, Severity] = field(default_factory=dict)  # per check code
    layer_ignores: list[tuple[str, frozenset[str]]] = field(default_factory=list)


MAX_SEED = 2**63 - 1  # torch generators take 64 bits; room for the small offsets added
# Hessian-vector products one option may ask for: each costs about two passes, so this
# is days on any model worth scanning; beyond it a typo, not a plan
MAX_PRODUCTS = 100_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(opts: ScanOptions) -> None:
    """Refuse option values the way the config file and NNHEALTH_* refuse them, whether
    they came from the command line or the Python API (one line, UsageError)."""
    if opts.mode not in MODES:
        raise UsageError(f"--mode {opts.mode!r}: expected train or eval")
    if opts.loss not in LOSSES:
        raise UsageError(f"--loss {opts.loss!r}: expected one of {', '.join(LOSSES)}")
    if not _is_int(opts.seed) or not 0 <= opts.seed <= MAX_SEED:
        raise UsageError(f"--seed {opts.seed!r}: expected an integer in [0, 2**63 - 1]")
    if opts.lr is not None and (
        isinstance(opts.lr, bool)
        or not isinstance(opts.lr, (int, float))
        or not (0 < opts.lr < math.inf)
    ):
        raise UsageError(f"--lr {opts.lr!r}: must be a positive, finite number")
    for name, value, low, high in (
        ("--hessian-top", opts.hessian_top, 1, MAX_PRODUCTS),
        ("--hessian-budget", opts.hessian_budget, 1, MAX_PRODUCTS),
        ("--hessian-trace", opts.hessian_trace, 0, MAX_PRODUCTS),
    ):
        if not _is_int(value) or not low <= value <= high:
            raise UsageError(f"{name} {value!r}: expected an integer in [{low}, {high:,}]")
    tol = opts.hessian_tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise UsageError(f"--hessian-tol {tol!r}: expected a number in (0, 1)")
    for name, tokens in (("--select", opts.select), ("--ignore", opts.ignore)):
        if tokens is not None and not [t for t in tokens if str(t).strip()]:
            raise UsageError(
                f"{name} names no check (an empty list); leave it out for the default "
                "checks, or give codes, prefixes or names (NH101, NH1, dead-relu)"
            )
