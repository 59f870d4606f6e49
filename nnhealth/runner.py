"""load -> plan -> capture -> analyze -> report. The CLI and the Python API share this."""

from __future__ import annotations

import copy
import inspect
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnhealth import __version__, distributed
from nnhealth._util import Progress, escaped
from nnhealth.analyzers import REGISTRY, select_checks
from nnhealth.analyzers.base import Check
from nnhealth.capture import weights as weight_stats
from nnhealth.capture.instrument import Observation, run_pass
from nnhealth.capture.params import capture_weights, module_owners
from nnhealth.capture.stats import ACTIVATION, Capture
from nnhealth.config import layer_ignored
from nnhealth.curvature.blocks import Examples
from nnhealth.curvature.measure import measure_planned
from nnhealth.curvature.stats import FINITE
from nnhealth.errors import UsageError, flag, report_text
from nnhealth.findings import AnalyzerError, Finding, Report, Skipped
from nnhealth.loading.batch import Batch, prepare
from nnhealth.loading.loss import LossResolver, objective, token_ids
from nnhealth.loading.model import LoadedModel
from nnhealth.optim import LAYERWISE, Optimizer, lr_note, resolve
from nnhealth.options import ScanOptions, validate
from nnhealth.plan import Plan, is_opt_in, make_plan


def _resolve_checks(
    opts: ScanOptions, lr: float | None = None
) -> list[tuple[type[Check], dict[str, Any]]]:
    try:
        checks = select_checks(opts.select, opts.ignore)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if opts.select is None and not opts.hessian:
        # an expensive check is opt-in: the Hessian asked for, or the check selected by name
        checks = [c for c in checks if not is_opt_in(c)]
    if not checks:
        raise UsageError(
            f"no checks left to run: {flag('select')}/{flag('ignore')} exclude every check"
        )
    known = {c.name for c in REGISTRY} | {c.code for c in REGISTRY}
    for key in opts.check_options:
        if key not in known:
            raise UsageError(f"options for unknown check {key!r}")
    return [(check, _check_options(check, opts, lr)) for check in checks]


def _check_options(check: type[Check], opts: ScanOptions, lr: float | None) -> dict[str, Any]:
    """The check's options: its defaults, overridden by the config (by code, then by
    name) and the scan's learning rate (``lr``: the optimizer's, else ``opts.lr``)."""
    overrides = {
        **opts.check_options.get(check.code, {}),
        **opts.check_options.get(check.name, {}),
    }
    lr = opts.lr if lr is None else lr
    if lr is not None and "lr" in check.defaults():
        overrides.setdefault("lr", lr)
    try:
        return check.resolve_options(overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def source_location(loaded: LoadedModel) -> dict[str, Any] | None:
    """Where findings point in code: the model class's source when it lives under the
    current directory, else the entry point's file or the model file, at line 1."""
    cwd = Path.cwd().resolve()

    def rel(path: str | Path) -> str | None:
        try:
            return Path(path).resolve().relative_to(cwd).as_posix()
        except (ValueError, OSError):
            return None

    if loaded.model is not None:
        try:
            file = inspect.getsourcefile(type(loaded.model))
        except TypeError:
            file = None
        # the class's line only for a class under the current directory: reading the
        # source of torch's own (nn.Sequential) took 8-17 ms on every monitored step
        where = rel(file) if file else None
        if where:
            try:
                line = inspect.getsourcelines(type(loaded.model))[1]
            except (TypeError, OSError):
                line = 1
            return {"file": where, "line": max(line, 1)}
    spec = loaded.source
    candidates = [spec, spec.rpartition(":")[0]] if ":" in spec else [spec]
    for cand in candidates:
        if cand and Path(cand).is_file() and rel(cand):
            return {"file": rel(cand), "line": 1}
    return None


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def analyze(
    capture: Capture, checks: list[tuple[type[Check], dict[str, Any]]]
) -> tuple[list[Finding], list[AnalyzerError], list[Skipped], dict[str, dict[str, Any]]]:
    """Run each check; returns findings, analyzer errors, skipped checks and the
    layer-table columns the checks contributed (keyed by site name for nonlinearities,
    by module name for layers)."""
    available = {"weights"}
    if capture.has_modules:
        available.add("modules")
    if capture.has_activations:
        available.add("activations")
    if capture.has_gradients:
        available.add("gradients")
    if capture.curvature is not None:
        available.add("curvature")
    findings: list[Finding] = []
    errors: list[AnalyzerError] = []
    skipped: list[Skipped] = []
    metrics: dict[str, dict[str, Any]] = {}
    for check, options in checks:
        missing = check.needs - available
        if missing:
            reason = capture.missing_reason or f"no {', '.join(sorted(missing))} were captured"
            if missing == {"curvature"}:
                reason = capture.curvature_reason or "--no-hessian: the Hessian was not measured"
            skipped.append(Skipped(check.code, check.name, reason))
            continue
        try:
            instance = check()
            findings.extend(instance.run(capture, options))
            for module, values in instance.metrics(capture, options).items():
                metrics.setdefault(module, {}).update(values)
        except Exception as exc:  # noqa: BLE001 (one broken check must not hide the others)
            errors.append(AnalyzerError(check.name, f"{type(exc).__name__}: {exc}"))
    return findings, errors, skipped, metrics


def layer_rows(capture: Capture, metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per layer/nonlinearity call in forward order, then parameter-only modules.
    A nonlinearity's row carries the checks' columns for its site; each module's first
    layer row (or its parameter-only row) its parameters' numbers and the checks'
    columns for the module."""
    by_module: dict[str, list] = {}
    for p in capture.params:
        by_module.setdefault(p.module, []).append(p)
    rows: list[dict[str, Any]] = []
    covered: set[str] = set()
    for s in sorted(capture.sites, key=lambda s: s.order):
        row: dict[str, Any] = {
            "name": s.name,
            "kind": s.kind,
            "role": s.role,
            "module": s.module,
            "functional": s.functional,
            "shape": list(s.shape),
            "units": s.units,
            "act_mean": s.mean,
            "act_var": s.var,
            "grad_var": s.grad_var,
            "nonfinite": s.nonfinite,
        }
        if s.role == ACTIVATION:
            # a nonlinearity module with parameters (PReLU) shares its name with the
            # module: the module's columns go on its params row, not here
            if s.name not in by_module:
                row.update(metrics.get(s.name, {}))
        elif s.module not in covered and s.module in by_module:
            covered.add(s.module)
            row.update(_param_summary(by_module[s.module]))
            row.update(metrics.get(s.module, {}))
        rows.append(row)
    for module, params in by_module.items():
        if module in covered:
            continue
        rows.append(
            {
                "name": module or "(root)",
                "kind": params[0].kind,
                "role": "params",
                "module": module,
                **_param_summary(params),
                **metrics.get(module, {}),
            }
        )
    return rows


def _param_summary(params: list) -> dict[str, Any]:
    weight = next((p for p in params if p.role in ("weight", "norm")), params[0])
    return {
        "params": sum(p.numel for p in params),
        "weight_norm": weight.norm,
        "weight_grad_norm": weight.grad_norm,
        "param_nonfinite": sum(p.nonfinite for p in params),
    }


def _weights_only(
    loaded: LoadedModel, rtol: float | None, reason: str = "only weight checks were selected"
) -> Capture:
    """No pass: a bare state_dict, or a model when only weight checks were selected (or
    when its forward cannot run here: ``reason``)."""
    model = loaded.model
    if model is None:
        capture = capture_weights(loaded.state, {})
        return replace(capture, weights=weight_stats.from_state_dict(loaded.state, rtol))
    capture = capture_weights(dict(model.named_parameters()), {}, module_owners(model))
    return replace(
        capture,
        missing_reason=reason,
        weights=weight_stats.from_model(model, (), rtol),
    )


def _float8(model: nn.Module | None) -> torch.dtype | None:
    """A float8 dtype among the model's parameters: PyTorch has no CPU kernels to run a
    float8 forward (matmul, clamp), only to store and convert."""
    if model is None:
        return None
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype.itemsize == 1:
            return p.dtype
    return None


def _for_products(
    model: nn.Module, batch: Batch, prepared: Batch, device: torch.device
) -> tuple[nn.Module, Any, str | None]:
    """The model and inputs for Hessian-vector products: a float32 copy of a bfloat16 or
    float16 model (each product in half precision carries a relative rounding of about
    its epsilon, 4e-3 in bfloat16, too coarse for the certified bound; the copy holds the
    same weights exactly), else the model itself. The copy costs one float32 parameter
    vector; a model that cannot be copied is measured as it is, and the note says so."""
    dtype = _model_dtype(model)
    if dtype not in (torch.bfloat16, torch.float16):
        return model, prepared.inputs, None
    name = str(dtype).removeprefix("torch.")
    try:
        wide = copy.deepcopy(model).float()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 (a module that refuses copying: user code)
        note = (
            f"Hessian-vector products in {name} (the model could not be copied to float32: "
            f"deepcopy {escaped(exc)}): each carries about {torch.finfo(dtype).eps:.0e} "
            "relative rounding, so the bound is only as good as that"
        )
        return model, prepared.inputs, note
    note = (
        f"Hessian-vector products on a float32 copy of the {name} weights (the same values; "
        f"{name} products carry about {torch.finfo(dtype).eps:.0e} relative rounding)"
    )
    return wide, prepare(batch, torch.float32, device).inputs, note


def _device(model: nn.Module, requested: str | None) -> torch.device:
    """The device the scan runs on: ``requested`` (the model is moved there), else the
    model's own."""
    device = torch.device(requested) if requested else _model_device(model)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"{flag('device')} cuda: no CUDA device is available here; use {flag('device')} cpu"
        )
    if requested:
        model.to(device)
    return device


def _curvature(
    capture: Capture,
    model: nn.Module,
    batch: Batch,
    prepared: Batch,
    device: torch.device,
    resolver: LossResolver,
    plan: Plan,
    progress: Progress | None,
) -> tuple[Capture, list[str]]:
    """The capture with the Hessian measured as the plan says (or the reason it was
    not), and the notes on how; the capture as it is when the plan measures none.
    With --hessian-batch/--hessian-batches, Lanczos runs on each sub-batch in turn."""
    if plan.curvature is None:
        return capture, []
    hess_model, hess_inputs, widened = _for_products(model, batch, prepared, device)
    # the pass's targets, so that a sub-batch's loss is the pass's on its examples
    whole = replace(prepared, inputs=hess_inputs, targets=resolver.targets)
    parts = _sub_batches(whole, resolver, plan.curvature)
    notes: list[str] = []
    measured: list[tuple[Any, _Wrap]] = []
    for i, (part, loss) in enumerate(parts):
        wrap = _Wrap(plan.optimizer)
        stats, reason, more = measure_planned(
            hess_model,
            loss.with_labels(part.inputs),  # the same call as the pass's
            loss,
            plan,
            _part_progress(progress, i, len(parts)),
            wrap=wrap,
            examples=hessian_examples(part, loss),
        )
        if stats is None:
            if reason is not None and len(parts) > 1:
                reason = f"sub-batch {i + 1} of {len(parts)} ({part.examples} examples): {reason}"
            return replace(capture, curvature=None, curvature_reason=reason), (
                [widened] if widened else []
            )
        measured.append((stats, wrap))
        notes += more
    stats, wrap = measured[0]
    if len(measured) > 1:
        stats = _combined([m for m, _ in measured])
    stats = replace(stats, examples=parts[0][0].examples, batches=len(parts))
    if plan.optimizer is not None:
        stats = replace(
            stats,
            limit_factor=plan.optimizer.limit_factor(),
            suggest_factor=plan.optimizer.suggest_factor(),
            optimizer=plan.optimizer.name,
            operator="preconditioned" if wrap.applied else "hessian",
            preconditioner=wrap.how if wrap.applied else None,
        )
    capture = replace(capture, curvature=stats, curvature_reason=None)
    notes = list(dict.fromkeys(notes))  # each sub-batch's Lanczos says the same things
    return capture, [widened, *notes] if widened else notes


def _sub_batches(
    whole: Batch, resolver: LossResolver, hessian: Any
) -> list[tuple[Batch, LossResolver]]:
    """The sub-batches the Hessian is measured on, each with the loss of its examples
    (the whole batch and the pass's loss when no sub-batch was asked for). UsageError
    when the batch is too small for them."""
    k, ranks = hessian.batches, distributed.current()
    if k == 1 and hessian.examples is None:
        return [(whole, resolver)]
    # across ranks every rank takes sub-batches of the same size (the smallest shard's
    # bound), so that each has an equal share and all decide (and refuse) alike
    total = whole.examples if ranks is None else distributed.smallest(whole.examples, ranks)
    batch = "the batch" if ranks is None else "the smallest rank's shard"
    n = hessian.examples if hessian.examples is not None else total // k
    if n > total:
        raise UsageError(
            f"{flag('hessian_batch')} {n}: {batch} has {total} examples; give at most "
            f"{total}, or leave it out for the whole batch"
        )
    if n == 0:
        raise UsageError(
            f"{flag('hessian_batches')} {k}: {batch} has {total} examples, fewer than one "
            f"per sub-batch; give at most {total}"
        )
    if k * n > total:
        raise UsageError(
            f"{flag('hessian_batches')} {k} x {flag('hessian_batch')} {n} = {k * n} "
            f"examples: {batch} has {total}; lower either so that the product is at most "
            f"{total}"
        )
    if k == 1 and n == total and ranks is None:
        return [(whole, resolver)]
    parts = [whole.take(i * n, (i + 1) * n, f"Hessian sub-batch {i + 1} of {k}") for i in range(k)]
    return [(part, _part_loss(resolver, part)) for part in parts]


def _part_loss(resolver: LossResolver, part: Batch) -> LossResolver:
    """The pass's loss on ``part``'s examples (a sub-batch), weighted as the pass's."""
    ranks = distributed.current()
    # across ranks every rank's sub-batch has as many examples: equal shares
    return _loss_on(resolver, part, resolver.weight if ranks is None else 1.0 / ranks.world)


def _loss_on(resolver: LossResolver, part: Batch, weight: float) -> LossResolver:
    """The pass's loss on ``part``'s examples: its choice, with ``part``'s targets, token
    ids (the next-token objective) and place in the batch (seeded random targets are the
    pass's, sliced), times ``weight``; its notes stay the pass's."""
    loss = copy.copy(resolver)
    loss.targets = part.targets
    loss.ids = token_ids(part.inputs)
    loss.part = part.part
    loss.notes = []
    loss.weight = weight
    return loss


def hessian_examples(part: Batch, loss: LossResolver) -> Examples:
    """``part`` as the Hessian's products may cut it into blocks (curvature/blocks.py):
    each block's inputs, and the loss on its examples weighted by their share of
    ``part``, so that the blocks' losses sum to ``loss``."""
    n = part.examples

    def cut(start: int, stop: int) -> tuple[Any, LossResolver]:
        block = part.take(start, stop, "Hessian block")
        block_loss = _loss_on(loss, block, loss.weight * (stop - start) / n)
        return block_loss.with_labels(block.inputs), block_loss

    return Examples(n, cut)


def _part_progress(progress: Progress | None, i: int, k: int) -> Progress | None:
    """``progress`` with each message prefixed by which sub-batch it is about."""
    if progress is None or k == 1:
        return progress

    def report(message: str, steps: tuple[int, int] | None = None) -> None:
        progress(f"sub-batch {i + 1}/{k}: {message}", steps=steps)

    return report


def _combined(parts: list[Any]) -> Any:
    """One record for K sub-batches (each a MeasuredCurvature): each eigenvalue (top-k,
    lambda_min) and the trace averaged over them, and their bounds too (the mean of K
    values each within b_i of its true value is within mean(b_i) of the true values'
    mean: still a certificate); products summed; each sub-batch's lambda_max kept. Other
    fields are the first sub-batch's (the model, the mode, the Lanczos variant)."""
    k = len(parts)
    depth = min(len(p.top) for p in parts)

    def mean(values: list[Any]) -> Any:
        return None if any(v is None for v in values) else statistics.fmean(values)

    def each(field: str) -> tuple[float, ...]:
        return tuple(mean([getattr(p, field)[j] for p in parts]) for j in range(depth))

    stderr = [p.trace_stderr for p in parts]
    return replace(
        parts[0],
        top=each("top"),
        bounds=each("bounds"),
        estimates=each("estimates"),
        converged=all(p.converged for p in parts),
        hvps=sum(p.hvps for p in parts),
        lanczos_hvps=sum(p.lanczos_hvps for p in parts),
        lambda_min=mean([p.lambda_min for p in parts]),
        lambda_min_bound=mean([p.lambda_min_bound for p in parts]),
        trace=mean([p.trace for p in parts]),
        # independent estimates: the mean's standard error
        trace_stderr=None if None in stderr else math.sqrt(sum(s * s for s in stderr)) / k,
        basis_vectors=max(p.basis_vectors for p in parts),
        restarts=sum(p.restarts for p in parts),
        batch_lambda_max=tuple(p.top[0] for p in parts),
        lambda_max_error=mean([p.lambda_max_error for p in parts]),
        **_how_products(parts),
    )


def _how_products(parts: list[Any]) -> dict[str, Any]:
    """How K sub-batches' products were taken: by finite differences if any was (then
    the largest estimated product error, and the step of the first such), else exact."""
    finite = [p for p in parts if p.hvp == FINITE]
    if not finite:
        return {}
    return {
        "hvp": FINITE,
        "hvp_step": finite[0].hvp_step,
        "hvp_error": max(p.hvp_error for p in finite),
    }


class _Wrap:
    """measure()'s ``wrap``: the Hessian operator seen through the optimizer's
    preconditioner (Adam's P^-1 from this batch's gradient and the saved state), or the
    operator itself when the optimizer has none (SGD with one learning rate)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.applied = False
        self.how: str | None = None

    def __call__(self, op: Any) -> Any:
        ranks = distributed.current()
        if ranks is not None:  # the whole batch's products, on every rank
            op = distributed.reduce_products(op, ranks)
        if self.optimizer is None or self.optimizer.kind in LAYERWISE:
            return op  # LARS/LAMB: the Hessian itself (their step is rescaled per layer)
        from nnhealth.curvature.preconditioned import Preconditioned

        names = [n for n, _ in op.named]  # those the loss uses, on the model products run on
        if self.optimizer.identity(names):
            return op  # plain SGD: no float64 gradient and diagonals (3 vectors) built
        flat = op.gradient()
        grads, offset = [], 0
        for p in op.params:
            grads.append(flat[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        scale, decay, how = self.optimizer.diagonal(names, op.params, grads)
        if scale is None and decay is None:
            return op
        # P = I with a coupled weight decay: the Hessian plus wd, not a preconditioned one
        self.applied, self.how = scale is not None, how
        if scale is None:
            scale = torch.ones(op.n, dtype=torch.float64, device=flat.device)
        return Preconditioned(op, scale, decay, how)


def _instrumented(
    loaded: LoadedModel,
    batch: Batch | None,
    opts: ScanOptions,
    plan: Plan,
    progress: Progress | None,
    observed: Observation | None = None,
) -> tuple[Capture, dict[str, Any], list[str]]:
    """The instrumented pass (and the curvature when planned): capture, run info, notes.
    ``observed``: the pass was the caller's own (nnhealth.Monitor): its records are
    taken, and no pass is run here."""
    model = loaded.model
    if batch is None:
        raise UsageError(
            f"no batch: give {flag('data')} FILE (.pt/.npz/.npy) or {flag('input_shape')}, "
            "e.g. 64x3x32x32"
        )
    device = _device(model, opts.device)
    prepared = prepare(batch, _model_dtype(model), device)
    notes = list(prepared.notes)
    inputs, resolver = objective(
        model,
        prepared.inputs,
        prepared.targets,
        opts.loss,
        opts.seed,
        loaded.loss_fn,
        part=prepared.part,
    )
    ranks = distributed.current()
    if ranks is not None:
        ranks = distributed.weigh(ranks, prepared.examples)
        resolver.weight = ranks.share
    if progress:
        progress("forward and backward pass")
    with distributed.synced_norms(ranks):
        capture = run_pass(
            model,
            inputs,
            resolver,
            plan,
            examples=prepared.examples,
            reduce_grads=None if ranks is None else distributed.grads_reducer(ranks, model),
            observed=observed,
        )
        if ranks is not None:
            capture = distributed.combined(capture, ranks)
        capture = replace(
            capture, weights=weight_stats.from_model(model, capture.sites, plan.symmetry_rtol)
        )
        capture, curvature_notes = _curvature(
            capture, model, batch, prepared, device, resolver, plan, progress
        )
    notes += curvature_notes
    notes += resolver.notes + list(capture.notes)
    if ranks is not None:
        notes.append(distributed.note(ranks))
        if capture.curvature is not None:
            whole = plan.curvature is None or (
                plan.curvature.examples is None and plan.curvature.batches == 1
            )
            capture = replace(capture, curvature=_over_ranks(capture.curvature, whole, ranks))
    info = {
        "batch": _described(prepared, ranks),
        "output_shape": resolver.output_shape,
        "loss": resolver.description,
        "loss_value": capture.loss,
        "mode": capture.mode,
        "device": str(device),
        "params": sum(p.numel for p in capture.params),
        "trainable_params": sum(p.numel for p in capture.params if p.trainable),
    }
    return capture, info, notes


def _over_ranks(curvature: Any, whole: bool, ranks: distributed.Ranks) -> Any:
    """The curvature record of a distributed scan: its ranks, and its examples over all
    of them (the whole batch, or N per rank: a sub-batch is the first N of every rank's
    shard)."""
    examples = ranks.examples if whole else curvature.examples * ranks.world
    return replace(curvature, ranks=ranks.world, examples=examples)


def _described(prepared: Batch, ranks: distributed.Ranks | None) -> dict[str, Any]:
    """The batch in the report: the whole of it over the ranks of a distributed scan."""
    described = {**prepared.describe(), "examples": prepared.examples}
    if ranks is not None:
        shape = described["shape"]
        described.update(examples=ranks.examples, ranks=ranks.world)
        described["shape"] = [ranks.examples, *shape[1:]] if shape else shape
    return described


def _captured(
    loaded: LoadedModel,
    batch: Batch | None,
    opts: ScanOptions,
    plan: Plan,
    progress: Progress | None,
    observed: Observation | None = None,
) -> tuple[Capture, dict[str, Any], list[str]]:
    """The plan's capture: the instrumented pass (or the caller's, ``observed``), or the
    weights alone when no selected check needs a pass (or the model cannot run one
    here)."""
    model = loaded.model
    eight = _float8(model)
    if model is not None and plan.forward and eight is None:
        return _instrumented(loaded, batch, opts, plan, progress, observed)
    reason = "only weight checks were selected"
    notes: list[str] = []
    if eight is not None and plan.forward:
        name = str(eight).removeprefix("torch.")
        reason = (
            f"the model's parameters are {name}, and PyTorch cannot run a {name} "
            "forward pass here; scan a bfloat16 or float32 copy (model.to(torch.bfloat16)) "
            "for the checks that need one"
        )
        notes.append(f"{name} parameters: weight checks only, no pass")
    capture = _weights_only(loaded, plan.symmetry_rtol, reason)
    info = {"params": sum(p.numel for p in capture.params)}
    return capture, info, notes + list(capture.notes)


def scan_optimizer(loaded: LoadedModel, opts: ScanOptions) -> tuple[Optimizer, list[str]]:
    """The scan's optimizer: the options over the one saved with the model (bound to
    its parameters by name and shape), else plain SGD."""
    saved = getattr(loaded, "optimizer", None)
    if saved is None or loaded.model is None:
        return resolve(opts)
    from nnhealth.errors import LoadError
    from nnhealth.loading.training_state import bind

    try:
        bound = bind(saved, loaded.model)
    except LoadError as exc:
        if saved.explicit:
            raise
        # found beside the weights (a fine-tune's optimizer over part of the model, whose
        # requires_grad the state_dict does not record): the scan goes on without it
        optimizer, notes = resolve(opts)
        return optimizer, [f"optimizer state not used: {exc.message}", *notes]
    optimizer, notes = resolve(opts, bound, saved.where)
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    outside = [n for n in trainable if optimizer.members is not None and n not in optimizer.members]
    if outside:
        notes.append(
            f"{len(outside)} trainable parameter tensor(s) are not in the optimizer "
            f"({', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}): not stepped, "
            "so not judged by NH301 and left out of the preconditioned Hessian"
        )
    return optimizer, notes


def _rendered(summary: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's summary with option references spelled as the report spells them."""
    return {k: report_text(v) if isinstance(v, str) else v for k, v in summary.items()}


def _optimizer_notes(optimizer: Optimizer, plan: Plan) -> list[str]:
    """Which optimizer the lr was judged for, and why, when anything was judged by it
    (an lr, the Hessian's limit) or it is not the default plain SGD."""
    default = optimizer.kind == "sgd" and not optimizer.has_state
    if default and optimizer.lr is None and plan.curvature is None:
        return []
    return [lr_note(optimizer)]


def needs_pass(opts: ScanOptions) -> bool:
    """Whether the checks ``opts`` selects run the model (so a batch is needed)."""
    return _plan(_resolve_checks(opts), opts).forward


def _plan(
    checks: list[tuple[type[Check], dict[str, Any]]], opts: ScanOptions, optimizer: Any = None
) -> Plan:
    try:
        return make_plan(checks, opts, optimizer)
    except ValueError as exc:  # two checks asking for different thresholds
        raise UsageError(str(exc)) from None


def run(
    loaded: LoadedModel,
    batch: Batch | None,
    opts: ScanOptions,
    *,
    progress: Progress | None = None,
    optimizer: tuple[Optimizer, list[str]] | None = None,
    observed: Observation | None = None,
) -> Report:
    """Scan a loaded model on a batch. Raises NnhealthError for what the user must fix.
    ``optimizer``: scan_optimizer's answer when the caller already has it; ``observed``:
    the pass the caller ran itself on ``batch`` (an exited capture.Observation)."""
    started = time.perf_counter()
    validate(opts)
    optimizer, optimizer_notes = optimizer or scan_optimizer(loaded, opts)
    summary = _rendered(optimizer.summary())
    checks = _resolve_checks(opts, optimizer.lr)
    # what the selected checks need or can use, nothing more
    plan = _plan(checks, opts, optimizer)
    model = loaded.model
    run_info: dict[str, Any] = {
        "model": loaded.source,
        "model_format": loaded.format,
        "model_class": type(model).__name__ if model is not None else None,
        "batch": None,
        "loss": None,
        "mode": None,
        "device": None,
        "seed": opts.seed,
        "lr": optimizer.lr,
        "optimizer": summary,
        "torch": torch.__version__,
        "model_source": source_location(loaded),
    }
    capture, info, pass_notes = _captured(loaded, batch, opts, plan, progress, observed)
    capture = replace(capture, optimizer=summary)
    run_info.update(info)
    if progress:
        progress("analyzing")
    findings, errors, skipped, metrics = analyze(capture, checks)
    findings = [
        replace(f, severity=opts.severities.get(f.code, f.severity))
        for f in findings
        if not layer_ignored(f.layer, f.code, opts.layer_ignores)
    ]
    run_info["seconds"] = round(time.perf_counter() - started, 3)
    run_info["checks"] = [c.code for c, _ in checks]
    order = {c.code: i for i, (c, _) in enumerate(checks)}
    findings.sort(key=lambda f: (-f.severity, order[f.code]))
    return Report(
        run=run_info,
        layers=tuple(layer_rows(capture, metrics)),
        findings=tuple(findings),
        errors=tuple(errors),
        skipped=tuple(skipped),
        notes=tuple(
            dict.fromkeys(
                [
                    *loaded.notes,
                    *map(report_text, [*_optimizer_notes(optimizer, plan), *optimizer_notes]),
                    *pass_notes,
                ]
            )
        ),
        curvature=None if capture.curvature is None else capture.curvature.to_dict(),
        tool_version=__version__,
    )
