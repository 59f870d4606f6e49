"""load -> plan -> capture -> analyze -> report. The CLI and the Python API share this."""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnhealth import __version__
from nnhealth._util import Progress, escaped
from nnhealth.analyzers import REGISTRY, select_checks
from nnhealth.analyzers.base import Check
from nnhealth.analyzers.curvature import Curvature
from nnhealth.analyzers.saturation import Saturation
from nnhealth.analyzers.symmetry import Symmetry
from nnhealth.capture import weights as weight_stats
from nnhealth.capture.instrument import run_pass
from nnhealth.capture.params import capture_weights
from nnhealth.capture.stats import Capture
from nnhealth.config import layer_ignored
from nnhealth.curvature.hvp import NoCurvature
from nnhealth.curvature.measure import measure
from nnhealth.errors import UsageError
from nnhealth.findings import AnalyzerError, Finding, Report, Skipped
from nnhealth.loading.batch import Batch, prepare
from nnhealth.loading.loss import LossResolver
from nnhealth.loading.model import LoadedModel
from nnhealth.options import ScanOptions, validate


def _resolve_checks(opts: ScanOptions) -> list[tuple[type[Check], dict[str, Any]]]:
    try:
        checks = select_checks(opts.select, opts.ignore)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if opts.select is None and not opts.hessian:
        # the expensive check is opt-in: --hessian, or selecting NH401 by name
        checks = [c for c in checks if c is not Curvature]
    if not checks:
        raise UsageError("no checks left to run: --select/--ignore exclude every check")
    known = {c.name for c in REGISTRY} | {c.code for c in REGISTRY}
    for key in opts.check_options:
        if key not in known:
            raise UsageError(f"options for unknown check {key!r}")
    out = []
    for check in checks:
        overrides = {
            **opts.check_options.get(check.code, {}),
            **opts.check_options.get(check.name, {}),
        }
        if opts.lr is not None and "lr" in check.defaults():
            overrides.setdefault("lr", opts.lr)
        try:
            out.append((check, check.resolve_options(overrides)))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return out


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
            line = inspect.getsourcelines(type(loaded.model))[1]
        except (TypeError, OSError):
            file = None
        if file and rel(file):
            return {"file": rel(file), "line": max(line, 1)}
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
    per-layer metrics the checks contributed (keyed by module name)."""
    available = {"weights"}
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


def layer_rows(
    capture: Capture, unit_fraction: float, metrics: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per layer/nonlinearity call in forward order, then parameter-only modules;
    each module's first row carries its parameters' numbers and the checks' metrics."""
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
        if s.ever_active is not None:
            row["dead_units"] = s.dead_units
            row["dead_fraction"] = s.dead_units / s.units
        if s.saturated_count is not None:
            sat = s.saturated_units(unit_fraction)
            row["saturated_units"] = sat
            row["saturated_fraction"] = sat / s.units
            row["mean_derivative"] = s.mean_derivative
        if s.role != "activation" and s.module not in covered and s.module in by_module:
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
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    capture = capture_weights(dict(model.named_parameters()), kinds)
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


def _instrumented(
    loaded: LoadedModel,
    batch: Batch | None,
    opts: ScanOptions,
    checks: list[tuple[type[Check], dict[str, Any]]],
    needs: set[str],
    sat_opts: dict[str, Any],
    rtol: float | None,
    fingerprints: bool,
    progress: Progress | None,
) -> tuple[Capture, dict[str, Any], list[str]]:
    """The instrumented pass (and the curvature when asked): capture, run info, notes."""
    model = loaded.model
    if batch is None:
        raise UsageError(
            "no batch: give --data FILE (.pt/.npz/.npy) or --input-shape, e.g. 64x3x32x32"
        )
    device = torch.device(opts.device) if opts.device else _model_device(model)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if opts.device:
        model.to(device)
    prepared = prepare(batch, _model_dtype(model), device)
    notes = list(prepared.notes)
    resolver = LossResolver(opts.loss, prepared.targets, opts.seed, custom=loaded.loss_fn)
    if progress:
        progress("forward and backward pass")
    capture = run_pass(
        model,
        prepared.inputs,
        resolver,
        examples=prepared.examples,
        mode=opts.mode,
        seed=opts.seed,
        activations="activations" in needs,
        gradients="gradients" in needs,
        saturation_derivative=sat_opts["derivative_fraction"],
        fingerprints=fingerprints,
    )
    capture = replace(capture, weights=weight_stats.from_model(model, capture.sites, rtol))
    if opts.hessian is not False and any(c is Curvature for c, _ in checks):
        try:
            hess_model, hess_inputs, widened = _for_products(model, batch, prepared, device)
            if widened:
                notes.append(widened)
            curvature, curvature_notes = measure(
                hess_model,
                hess_inputs,
                resolver,
                mode=opts.mode,
                seed=opts.seed,
                top=opts.hessian_top,
                smallest=opts.hessian_min,
                tol=opts.hessian_tol,
                budget=opts.hessian_budget,
                trace_probes=opts.hessian_trace,
                progress=progress,
            )
            capture = replace(capture, curvature=curvature)
            notes += curvature_notes
        except NoCurvature as exc:
            capture = replace(capture, curvature_reason=str(exc))
    notes += resolver.notes + list(capture.notes)
    info = {
        "batch": {**prepared.describe(), "examples": prepared.examples},
        "output_shape": resolver.output_shape,
        "loss": resolver.description,
        "loss_value": capture.loss,
        "mode": opts.mode,
        "device": str(device),
        "params": sum(p.numel for p in capture.params),
        "trainable_params": sum(p.numel for p in capture.params if p.trainable),
    }
    return capture, info, notes


def run(
    loaded: LoadedModel,
    batch: Batch | None,
    opts: ScanOptions,
    *,
    progress: Progress | None = None,
) -> Report:
    """Scan a loaded model on a batch. Raises NnhealthError for what the user must fix."""
    started = time.perf_counter()
    validate(opts)
    checks = _resolve_checks(opts)
    # the plan: what the selected checks need or can use; nothing more is captured
    needs = set().union(*(c.needs | c.uses for c, _ in checks)) if checks else set()
    sat_opts = next((o for c, o in checks if c is Saturation), Saturation.defaults())
    sym_opts = next((o for c, o in checks if c is Symmetry), None)
    rtol = None if sym_opts is None else sym_opts["rtol"]
    notes: list[str] = list(loaded.notes)
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
        "lr": opts.lr,
        "torch": torch.__version__,
        "model_source": source_location(loaded),
    }
    eight = _float8(model)
    if model is None or not (needs - {"weights"}) or eight is not None:
        reason = "only weight checks were selected"
        if eight is not None and needs - {"weights"}:
            name = str(eight).removeprefix("torch.")
            reason = (
                f"the model's parameters are {name}, and PyTorch cannot run a {name} "
                "forward pass here; scan a bfloat16 or float32 copy (model.to(torch.bfloat16)) "
                "for the checks that need one"
            )
            notes.append(f"{name} parameters: weight checks only, no pass")
        capture = _weights_only(loaded, rtol, reason)
        notes += list(capture.notes)
        run_info["params"] = sum(p.numel for p in capture.params)
    else:
        capture, info, pass_notes = _instrumented(
            loaded, batch, opts, checks, needs, sat_opts, rtol, sym_opts is not None, progress
        )
        run_info.update(info)
        notes += pass_notes
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
        layers=tuple(layer_rows(capture, sat_opts["unit_fraction"], metrics)),
        findings=tuple(findings),
        errors=tuple(errors),
        skipped=tuple(skipped),
        notes=tuple(dict.fromkeys(notes)),
        curvature=None if capture.curvature is None else capture.curvature.to_dict(),
        tool_version=__version__,
    )
