"""nnhealth: one-pass training-health diagnostics for PyTorch models.

    import nnhealth
    report = nnhealth.scan(model, (inputs, targets))
    assert report.ok(), report.findings

Importing nnhealth does not import torch; ``scan`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nnhealth.findings import Finding, Report, Severity
from nnhealth.options import DEFAULTS as _DEFAULTS

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "Monitor",
    "NnhealthWarning",
    "Report",
    "Severity",
    "TrainingHealthError",
    "__version__",
    "scan",
]

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def __getattr__(name: str) -> Any:
    """Monitor and its warning and error, imported on first use (they import torch)."""
    if name in ("Monitor", "NnhealthWarning", "TrainingHealthError"):
        from nnhealth import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module 'nnhealth' has no attribute {name!r}")


def scan(
    model: Any,
    batch: Any = None,
    loss_fn: Callable | None = None,
    *,
    select: list[str] | None = _DEFAULTS["select"],
    ignore: list[str] | None = _DEFAULTS["ignore"],
    loss: str = _DEFAULTS["loss"],
    seed: int = _DEFAULTS["seed"],
    mode: str = _DEFAULTS["mode"],
    lr: float | None = _DEFAULTS["lr"],
    optimizer: Any = _DEFAULTS["optimizer"],
    momentum: float | None = _DEFAULTS["momentum"],
    betas: tuple[float, float] | None = _DEFAULTS["betas"],
    eps: float | None = _DEFAULTS["eps"],
    weight_decay: float | None = _DEFAULTS["weight_decay"],
    optimizer_state: Any = _DEFAULTS["optimizer_state"],
    hessian: bool | None = _DEFAULTS["hessian"],
    hessian_top: int = _DEFAULTS["hessian_top"],
    hessian_min: bool = _DEFAULTS["hessian_min"],
    hessian_trace: int = _DEFAULTS["hessian_trace"],
    hessian_tol: float = _DEFAULTS["hessian_tol"],
    hessian_budget: int = _DEFAULTS["hessian_budget"],
    hessian_batch: int | None = _DEFAULTS["hessian_batch"],
    hessian_batches: int = _DEFAULTS["hessian_batches"],
    options: dict[str, dict[str, Any]] | None = None,
    what_if: bool = _DEFAULTS["what_if"],
    what_if_budget: float = _DEFAULTS["what_if_budget"],
    baseline: str | Path | None = _DEFAULTS["baseline"],
    baseline_tolerance: float = _DEFAULTS["baseline_tolerance"],
) -> Report:
    """Scan an in-memory ``model`` on ``batch`` (a tensor, ``(inputs, targets)`` or a dict).

    Without a ``batch``, one is inferred from the model's first layer (as ``nnhealth
    scan model.pt`` does; the report's ``run["batch"]["source"]`` says how) or
    ``NnhealthError`` says why none can be.

    The model is left exactly as it was found: train/eval mode, ``requires_grad``,
    ``.grad``, buffers (BatchNorm statistics) and hooks. ``loss_fn(output, targets)``
    overrides the automatic loss choice; ``lr`` is the learning rate the norm-ratio
    and curvature checks judge against, for ``optimizer``: a name ("sgd", "momentum",
    "nesterov", "adam", "adamw", "rmsprop", "lars", "lamb") with ``momentum``, ``betas``,
    ``eps``, ``weight_decay``, or a live ``torch.optim.Optimizer`` over the model's
    parameters (its class, hyper-parameters, lr and state are read, nothing changed).
    ``optimizer_state``: a saved ``optimizer.state_dict()`` (a dict, or a file or Hugging
    Face Trainer checkpoint folder read with weights_only=True) to judge by.
    ``hessian=True`` (or selecting NH401) measures the Hessian's top ``hessian_top``
    eigenvalues by Lanczos (and the smallest with ``hessian_min``, the trace with
    ``hessian_trace`` Hutchinson probes) to relative error ``hessian_tol`` within
    ``hessian_budget`` Hessian-vector products, on the batch's first ``hessian_batch``
    examples (default: all), or as the mean and spread over ``hessian_batches`` disjoint
    sub-batches.
    ``what_if=True`` re-scans a copy of the model with each recommended fix applied
    (``Report.what_if``), within ``what_if_budget`` seconds. ``baseline`` (a file
    written by ``nnhealth scan --write-baseline``) marks each finding new, worse (its
    score grew by more than ``baseline_tolerance``), unchanged or fixed
    (``Report.baseline``). ``options`` overrides check thresholds, e.g.
    ``{"dead-relu": {"warn_fraction": 0.2}}``. Raises ``NnhealthError`` on bad input;
    its message names options by these keywords.

    Called on every rank of a torch.distributed job (after ``init_process_group``;
    a ``DistributedDataParallel`` model is scanned through its module), each rank's
    ``batch`` is its part of the whole: the report, the same on every rank, is that of
    one process on all the ranks' examples (see ``nnhealth.distributed``).
    """
    given = dict(locals())  # the keywords, before any other name is bound
    from nnhealth import distributed, pipeline
    from nnhealth.loading.batch import interpret

    loaded, opts = _arguments(given)
    with distributed.failures(distributed.current()):
        return pipeline.run(
            loaded,
            None if batch is None else interpret(batch, "batch"),
            opts,
            what_if=what_if,
            what_if_budget=what_if_budget,
            baseline=baseline,
            baseline_tolerance=baseline_tolerance,
        )


def _arguments(given: dict[str, Any]) -> tuple[Any, Any]:
    """scan()'s keywords as the pipeline takes them: (LoadedModel, ScanOptions)."""
    from torch import nn

    from nnhealth.errors import UsageError
    from nnhealth.loading.model import LoadedModel
    from nnhealth.options import OPTIONS, Betas, ScanOptions, Scope

    model = given["model"]
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"scan() takes a torch.nn.Module, not {type(model).__name__}: for a file, run "
            "`nnhealth scan PATH` (it loads safely), or load the module yourself"
        )
    loaded = LoadedModel(
        model=model,
        format="in-memory module",
        source=type(model).__name__,
        loss_fn=given["loss_fn"],
    )
    scan_keywords = {
        o.name: given[o.name] for o in OPTIONS if o.scope == Scope.SCAN and o.name in given
    }
    scan_keywords["optimizer"], loaded.optimizer = _optimizer_arguments(
        given["optimizer"], given["optimizer_state"], model
    )
    if given["betas"] is not None:
        scan_keywords["betas"] = Betas().coerce(given["betas"])
    opts = ScanOptions(**scan_keywords, check_options=dict(given["options"] or {}))
    return loaded, opts


def _optimizer_arguments(optimizer: Any, state: Any, model: Any) -> tuple[str | None, Any]:
    """scan()'s ``optimizer`` as a name, and the saved state to judge by (a
    SavedOptimizer): from a live torch.optim.Optimizer, a state_dict, or a path."""
    from dataclasses import replace
    from pathlib import Path

    from nnhealth.loading.training_state import (
        SavedOptimizer,
        find_saved_optimizer,
        read_optimizer_state,
    )
    from nnhealth.options import BY_NAME

    saved = None
    if isinstance(state, str):
        BY_NAME["optimizer_state"].refuse(state)  # "" is no path
    if isinstance(state, (str, Path)):
        saved = read_optimizer_state(Path(state))
    elif state is not None:
        saved = find_saved_optimizer(state, "optimizer_state")
        if saved is None:
            from nnhealth.errors import UsageError

            raise UsageError(
                "optimizer_state: expected an optimizer.state_dict(), a checkpoint dict "
                f"holding one, or a path; got {type(state).__name__}"
            )
    if saved is not None:
        saved = replace(saved, explicit=True)  # given on purpose: a mismatch is refused
    if optimizer is not None and not isinstance(optimizer, str):
        if not hasattr(optimizer, "state_dict") or not hasattr(optimizer, "param_groups"):
            from nnhealth.errors import UsageError

            raise UsageError(
                "optimizer: expected a name (sgd, momentum, nesterov, adam, adamw, rmsprop, "
                f"lars, lamb) or a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        where = f"the {type(optimizer).__name__} passed to scan()"
        saved = saved or SavedOptimizer(_named_state(optimizer, model), None, where, True)
        optimizer = None  # its class comes from its param groups, as from a file
    return optimizer, saved


def _named_state(optimizer: Any, model: Any) -> dict:
    """A live optimizer's state_dict with each group's ``param_names`` (its parameter
    objects are known: no guessing by order). The state's tensors are the optimizer's
    own: nnhealth only reads them, and steps copies."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    for group, live in zip(sd["param_groups"], optimizer.param_groups, strict=True):
        if all(id(p) in names for p in live["params"]):
            group["param_names"] = [names[id(p)] for p in live["params"]]
    return sd
