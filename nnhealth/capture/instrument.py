"""The one instrumented forward/backward pass.

Two mechanisms, both removed in ``finally``:

* forward pre/post hooks on every submodule keep an ordered stack of the modules that
  are running (so a functional call is named after the module it ran in, and a failure
  after the innermost module that raised), and reduce each parametric layer's output;
* a ``TorchFunctionMode`` sees every nonlinearity however it is written: ``nn.ReLU``,
  ``nn.ReLU(inplace=True)``, ``F.relu``, ``torch.tanh``, ``x.sigmoid()``.

Outputs are reduced on the spot to per-unit sums, sums of squares and counters;
gradients w.r.t. each output are reduced by tensor hooks during the backward. No
activation tensor is kept. Gradients are taken with ``torch.autograd.grad`` so the
caller's ``.grad`` fields are never touched.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nnhealth._util import escaped, first_line, out_of_memory, tensors_in
from nnhealth.capture.activations import build_table
from nnhealth.capture.params import module_owners, param_stats
from nnhealth.capture.precision import dtype_name, exact32, readable
from nnhealth.capture.state import preserved_state
from nnhealth.capture.stats import (
    ACTIVATION,
    LAYER,
    NORM,
    ActivationSpec,
    Capture,
    SiteStats,
)
from nnhealth.capture.structure import (
    _CHANNEL_FIRST_TYPES,
    is_activation_module,
    is_norm,
)
from nnhealth.errors import CaptureError


def _first_tensor(obj: Any) -> torch.Tensor | None:
    found = tensors_in(obj)
    return found[0] if found else None


def _shapes(args: Any) -> list[list[int]]:
    return [list(t.shape) for t in tensors_in(args)]


@dataclass
class _Site:
    """Accumulator for one site while the pass runs (tensors, converted at the end)."""

    name: str
    module: str
    kind: str
    role: str
    functional: bool
    order: int
    shape: tuple[int, ...]
    unit_dim: int
    spec: ActivationSpec | None
    units: int
    per_unit_count: int
    mean: float
    var: float
    nonfinite: int = 0
    active: torch.Tensor | None = None
    saturated: torch.Tensor | None = None
    fingerprint: torch.Tensor | None = None
    interior: torch.Tensor | None = None
    positive_fraction: float | None = None
    ptr: int = 0
    is_output: bool = False
    grad_count: int = 0
    grad_mean: float | None = None
    grad_m2: float | None = None
    grad_nonfinite: int = 0
    grad_order: int | None = None
    dtype: str = "float32"
    eps: float = 2.0**-23


@dataclass
class _Frame:
    name: str
    module: nn.Module
    input_shapes: list[list[int]] = field(default_factory=list)


class _Recorder:
    def __init__(
        self,
        model: nn.Module,
        table: dict,
        keep_grads: bool,
        fingerprints: bool,
        seed: int,
        examples: int,
    ) -> None:
        self.model = model
        self.table = table
        self.keep_grads = keep_grads
        self.fingerprints = fingerprints
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._probe_cache: dict[tuple, torch.Tensor] = {}
        self.stack: list[_Frame] = []
        self.sites: list[_Site] = []
        self.calls: Counter[str] = Counter()
        self.busy = False
        self.done = False  # set once the forward has returned
        self.channels: int | None = None  # channel count of the last channel-first layer
        self.grad_events = 0
        self.failure: _Frame | None = None
        self.examples = examples

    # ---- module stack ---------------------------------------------------------------
    def pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.done:  # hooks also fire in checkpoint recomputation during backward
                self.stack.append(_Frame(name, module, _shapes(args)))

        return hook

    def post_hook(self, name: str, tracked: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.done:
                return
            if self.stack and self.stack[-1].module is module:
                self.stack.pop()
            if not tracked:
                return
            out = _first_tensor(output)
            if out is None:
                return
            channel_first = isinstance(module, _CHANNEL_FIRST_TYPES)
            if channel_first and out.ndim >= 3:
                self.channels = out.shape[1]  # the layout later nonlinearities are read in
            elif not is_norm(module):
                self.channels = None
            role = NORM if is_norm(module) else LAYER
            self.record(out, name, type(module).__name__, role, False, channel_first)

        return hook

    def mark_output(self, out: torch.Tensor | None) -> None:
        """Flag the last site whose output is the model's output (it feeds the loss)."""
        if out is None:
            return
        for site in reversed(self.sites):
            if site.ptr == out.data_ptr() and site.shape == tuple(out.shape):
                site.is_output = True
                return

    def record_failure(self) -> None:
        if self.stack and self.failure is None:
            self.failure = self.stack[-1]

    # ---- activations --------------------------------------------------------------
    def on_activation(self, spec: ActivationSpec, out: torch.Tensor) -> None:
        if self.done or out.ndim == 0 or self.examples not in tuple(out.shape):
            return  # after the forward, or a nonlinearity of parameters (a learned gate)
        channel_first = (
            self.channels is not None and out.ndim >= 3 and out.shape[1] == self.channels
        )
        if self.stack:
            top = self.stack[-1]
            owner, module = top.name, top.module
        else:
            owner, module = "", self.model
        module_form = is_activation_module(module)
        if module_form and owner:
            self.record(out, owner, spec.kind, ACTIVATION, False, channel_first, spec)
        else:
            base = f"{owner or '(root)'}:{spec.kind}"
            self.record(out, base, spec.kind, ACTIVATION, True, channel_first, spec)

    # ---- reduction ----------------------------------------------------------------
    def record(
        self,
        out: torch.Tensor,
        base: str,
        kind: str,
        role: str,
        functional: bool,
        channel_first: bool,
        spec: ActivationSpec | None = None,
    ) -> None:
        if not readable(out) or out.numel() == 0:
            return
        self.calls[base] += 1
        n_call = self.calls[base]
        name = base if n_call == 1 else f"{base}#{n_call}"
        module = base.split(":")[0] if functional else base
        self.busy = True
        try:
            with torch.no_grad():
                # bfloat16/float16/float8 values, exactly, in float32: half-precision
                # sums lose the small variances we report, comparisons against the
                # saturation bounds must see the stored values
                x = exact32(out.detach())
                if x.ndim <= 1:
                    x = x.reshape(-1, 1)
                unit_dim = 1 if (channel_first and x.ndim >= 3) else x.ndim - 1
                dims = tuple(d for d in range(x.ndim) if d != unit_dim)
                units = x.shape[unit_dim]
                per_unit = x.numel() // units
                mean, var = _moments(x)
                nonfinite = 0
                if not (math.isfinite(mean) and math.isfinite(var)):
                    nonfinite = int((~torch.isfinite(x)).sum())
                site = _Site(
                    name=name,
                    module=module,
                    kind=kind,
                    role=role,
                    functional=functional,
                    order=len(self.sites),
                    shape=tuple(out.shape),
                    unit_dim=unit_dim,
                    spec=spec,
                    units=units,
                    per_unit_count=per_unit,
                    mean=mean,
                    var=max(var, 0.0) if math.isfinite(var) else var,
                    nonfinite=nonfinite,
                    ptr=out.data_ptr(),
                    dtype=dtype_name(out.dtype),
                    eps=float(torch.finfo(out.dtype).eps),
                )
                exact_f32 = site.per_unit_count < 2**24  # float32 counts are exact below
                umax = None
                if spec is not None and spec.can_die:
                    # a unit was ever active iff its largest output is > 0 (ReLU family
                    # outputs are >= 0); a max-reduction, no mask, no temporary
                    umax = x.amax(dim=dims)
                    site.active = umax > 0
                    if spec.derivative == "hard":  # ReLU6: flat at 0 as well as at the top
                        site.positive_fraction = float(torch.sign(x).sum()) / x.numel()
                if self.fingerprints and role == ACTIVATION:
                    umax = x.amax(dim=dims) if umax is None else umax
                    umin = x.amin(dim=dims)
                    proj = _unit_projection(x, unit_dim, self._probes)
                    site.fingerprint = torch.cat([proj, umin[:, None], umax[:, None]], dim=1)
                    site.interior = _interior(x, unit_dim, dims, umin, umax, proj)
                if spec is not None and (spec.sat_lo is not None or spec.sat_hi is not None):
                    site.saturated = _count_saturated(x, spec, dims, exact_f32)
            self.sites.append(site)
            if self.keep_grads and out.requires_grad:
                out.register_hook(self._grad_hook(site))
        finally:
            self.busy = False

    def _probes(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Random zero-sum probe vectors of ``shape`` (last dim: probes), made once per
        shape and reused by every site of that shape."""
        key = (shape, like.device, like.dtype)
        if key not in self._probe_cache:
            if like.device not in self._generators:
                gen = torch.Generator(device=like.device).manual_seed(self.seed)
                self._generators[like.device] = gen
            r = torch.randn(
                shape, generator=self._generators[like.device], device=like.device, dtype=like.dtype
            )
            self._probe_cache[key] = r - r.reshape(-1, shape[-1]).mean(dim=0)
        return self._probe_cache[key]

    def _grad_hook(self, site: _Site) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            g = exact32(grad.detach())  # a bfloat16 sum of squares is badly wrong
            n = g.numel()
            mean, var = _moments(g)
            m2 = var * n
            if not math.isfinite(m2):
                site.grad_nonfinite += int((~torch.isfinite(g)).sum())
            site.grad_count, site.grad_mean, site.grad_m2 = n, mean, m2  # fires once
            if site.grad_order is None:
                site.grad_order = self.grad_events
                self.grad_events += 1

        return hook


# Values per row of the sum of squares: a float32 accumulation over 1024 values loses
# ~1e-7 relative; one vector norm over millions of them loses 1e-4 (4M) to 4e-3 (32M).
_ROW = 1024
# E[x^2] - E[x]^2 loses about 1e-7 * (1 + mean^2 / var) relative; beyond this ratio
# (1e-7 * 31: a few 1e-6 at worst) the centered two-pass formula is used instead.
_CANCELLATION_RATIO = 30.0


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Every element of ``x`` as a 1-D view in memory order (a copy only if ``x`` has
    gaps or overlaps)."""
    if not x.is_contiguous():
        order = sorted(range(x.ndim), key=lambda d: -x.stride(d))
        permuted = x.permute(order)
        if permuted.is_contiguous():
            x = permuted
    return x.reshape(-1)


def _sum_squares(x: torch.Tensor) -> float:
    """Sum of x^2 over every element of a float32/float64 tensor: a vector norm per row of
    ``_ROW`` values (one reduction call, no temporary the size of ``x``), rows summed
    in float64."""
    flat = _flat(x)
    n = flat.numel()
    rows = n // _ROW
    total = 0.0
    if rows:
        norms = torch.linalg.vector_norm(flat[: rows * _ROW].view(rows, _ROW), dim=1)
        total = float(norms.double().square().sum())
    if n > rows * _ROW:
        total += float(torch.linalg.vector_norm(flat[rows * _ROW :].double())) ** 2
    return total


def _moments(x: torch.Tensor) -> tuple[float, float]:
    """Mean and population variance of every element of ``x`` (float32 or float64).

    One pass of reductions (cheap: no float64 copy of the activation; the sum is
    cascaded, the sum of squares taken by rows), falling back to the centered two-pass
    formula where the mean is so large against the spread that the one-pass difference
    E[x^2] - E[x]^2 would cancel.
    """
    n = x.numel()
    mean = float(x.sum()) / n
    second = _sum_squares(x) / n
    var = second - mean * mean
    if mean * mean > _CANCELLATION_RATIO * var:
        var = float((x - mean).square_().sum()) / n
    return mean, var


# Units whose fingerprints lie within this (relative) of another's get their values
# counted; the symmetry check's tolerance is 1e-6, this leaves it room up to 1e-4.
CANDIDATE_RTOL = 1e-4


def _interior(
    x: torch.Tensor,
    unit_dim: int,
    dims: tuple[int, ...],
    umin: torch.Tensor,
    umax: torch.Tensor,
    proj: torch.Tensor,
) -> torch.Tensor:
    """Per unit, the values strictly between its min and max, #(x > min) - #(x == max),
    for the units that may have a twin; -1 for the others (not counted).

    A ReLU's zeros and a saturated unit's bound are shared by many units; what can tell
    two units apart is the rest. The symmetry check weighs a group of equal units by it.
    Counting every unit would cost two comparisons and two boolean reductions over the
    whole activation; twins have near-equal projections, so only the units whose nearest
    neighbour in the sorted first projection lies within ``CANDIDATE_RTOL`` of the
    largest projection norm are counted (usually none).
    """
    count = torch.full(umin.shape, -1, dtype=torch.int64, device=x.device)
    live = torch.nonzero(umax > umin).reshape(-1)
    if live.numel() < 2:
        return count
    p = proj[live].double()
    window = CANDIDATE_RTOL * float(torch.linalg.vector_norm(p, dim=1).max())
    order = torch.argsort(p[:, 0])
    close = (p[order[1:], 0] - p[order[:-1], 0]).abs() <= window
    near = torch.zeros(order.numel(), dtype=torch.bool, device=x.device)
    near[1:] |= close
    near[:-1] |= close
    chosen = live[order[near]]
    if chosen.numel() == 0:
        return count
    xs = x.index_select(unit_dim, chosen)
    shape = [1] * x.ndim
    shape[unit_dim] = -1
    inside = (xs > umin[chosen].reshape(shape)).sum(dim=dims)
    inside -= (xs >= umax[chosen].reshape(shape)).sum(dim=dims)
    count[chosen] = inside.clamp_(min=0)
    return count


def _unit_projection(
    x: torch.Tensor, unit_dim: int, probes: Callable[[tuple[int, ...], torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Each unit's outputs over the batch (and positions) projected on two random
    zero-sum vectors, by matrix products (no temporary the size of ``x``): (units, 2).

    Zero-sum vectors cancel a unit's constant part, so units that differ only slightly
    around a large common value (saturated ones) still get clearly different projections;
    identical units get identical ones.
    """
    if unit_dim == x.ndim - 1:
        flat = x.reshape(-1, x.shape[-1])  # (values per unit, units)
        return flat.T @ probes((flat.shape[0], 2), x)
    flat = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, positions), unit_dim == 1
    return torch.bmm(flat, probes((x.shape[0], flat.shape[2], 2), x)).sum(dim=0)


def _count_saturated(
    x: torch.Tensor, spec: ActivationSpec, dims: tuple[int, ...], exact_f32: bool
) -> torch.Tensor:
    """Per-unit count of values with y <= sat_lo or y >= sat_hi, with one float temporary.

    The region is written as d >= 0 (d = |y - centre| - half-width for two bounds), and
    sign(d) + 1 clamped to 1 is 1 exactly where d >= 0, bounds included (hard variants
    sit exactly on them).
    """
    lo, hi = spec.sat_lo, spec.sat_hi
    if not exact_f32:
        mask = (x >= hi) if hi is not None else torch.zeros_like(x, dtype=torch.bool)
        if lo is not None:
            mask |= x <= lo
        return mask.sum(dim=dims)
    if lo is not None and hi is not None:
        d = (x - (lo + hi) / 2).abs_().sub_((hi - lo) / 2)
    elif hi is not None:
        d = x - hi
    else:
        d = lo - x
    return d.sign_().add_(1).clamp_(max=1).sum(dim=dims)


class _ActivationMode(TorchFunctionMode):
    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rec = self.recorder
        if not rec.busy:
            factory = rec.table.get(func)
            if (
                factory is not None
                and isinstance(out, torch.Tensor)
                and not (args and isinstance(args[0], nn.Parameter))  # a learned gate
            ):
                rec.on_activation(factory(args, kwargs or {}), out)
        return out


# ---- state the pass must leave as it found it ---------------------------------------


def _counts(arr: np.ndarray | None) -> np.ndarray | None:
    return None if arr is None else np.nan_to_num(arr).astype(np.int64).reshape(-1)


def _freeze(site: _Site, examples: int) -> SiteStats:
    def np_(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.detach().cpu().numpy()

    return SiteStats(
        name=site.name,
        module=site.module,
        kind=site.kind,
        role=site.role,
        functional=site.functional,
        order=site.order,
        shape=site.shape,
        unit_dim=site.unit_dim,
        examples=examples,
        per_unit_count=site.per_unit_count,
        units=site.units,
        mean=site.mean,
        var=site.var,
        nonfinite=site.nonfinite,
        ever_active=None if site.active is None else np_(site.active).reshape(-1),
        unit_fingerprint=None
        if site.fingerprint is None
        else np_(site.fingerprint).astype(np.float64),
        unit_interior=_counts(np_(site.interior)),
        saturated_count=_counts(np_(site.saturated)),
        spec=site.spec,
        grad_count=site.grad_count,
        grad_mean=site.grad_mean,
        grad_m2=site.grad_m2,
        grad_nonfinite=site.grad_nonfinite,
        grad_order=site.grad_order,
        positive_fraction=site.positive_fraction,
        is_output=site.is_output,
        dtype=site.dtype,
        eps=site.eps,
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """model(x), model(*inputs) or model(**inputs), by the batch's structure."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


LossFactory = Callable[[Any], torch.Tensor]


def run_pass(
    model: nn.Module,
    inputs: Any,
    make_loss: LossFactory,
    *,
    examples: int,
    mode: str = "train",
    seed: int = 0,
    activations: bool = True,
    gradients: bool = True,
    saturation_derivative: float = 0.05,
    fingerprints: bool = False,
) -> Capture:
    """One forward (+ backward) of ``model`` on ``inputs``; returns frozen statistics.

    ``make_loss(output)`` turns the model's output into a scalar loss. ``activations``
    False runs without hooks (TorchScript). ``fingerprints`` adds a per-unit fingerprint
    of each nonlinearity's outputs (for the symmetry check). Raises ``CaptureError`` naming the
    innermost module that was running when the model raised.
    """
    scripted = isinstance(model, torch.jit.ScriptModule)
    instrument = activations and not scripted
    recorder = _Recorder(
        model,
        build_table(saturation_derivative),
        gradients,
        fingerprints and instrument,
        seed,
        examples,
    )
    handles = []
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    notes: list[str] = []
    device = next((p.device for p in _tensors_of(model)), torch.device("cpu"))
    cuda = [device.index or 0] if device.type == "cuda" else []
    with preserved_state(model, mode), torch.random.fork_rng(devices=cuda):
        # seed exactly the generators fork_rng restores (torch.manual_seed would also
        # reseed every other accelerator and leave the caller's state changed there)
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        try:
            if instrument:
                for mname, module in model.named_modules():
                    tracked = next(module.parameters(recurse=False), None) is not None and (
                        not is_activation_module(module)  # PReLU: recorded as a nonlinearity
                    )
                    handles.append(module.register_forward_pre_hook(recorder.pre_hook(mname)))
                    handles.append(module.register_forward_hook(recorder.post_hook(mname, tracked)))
            with torch.enable_grad():
                try:
                    if instrument:
                        with _ActivationMode(recorder):
                            output = call_model(model, inputs)
                    else:
                        output = call_model(model, inputs)
                    recorder.done = True
                    recorder.mark_output(_first_tensor(output))
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # the user's model: sys.exit and BaseException too
                    recorder.record_failure()
                    raise _forward_error(exc, recorder.failure, inputs) from exc
                loss = make_loss(output)
                del output
                grads: dict[str, torch.Tensor | None] | None = None
                if gradients and trainable and loss.requires_grad:
                    try:
                        got = torch.autograd.grad(
                            loss, [p for _, p in trainable], allow_unused=True
                        )
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:  # a custom backward or tensor hook: user code
                        raise CaptureError(
                            f"the backward pass failed: {escaped(exc)} (a custom autograd "
                            "Function's backward or a tensor hook)"
                        ) from exc
                    grads = {n: g for (n, _), g in zip(trainable, got, strict=True)}
                elif gradients:
                    notes.append(
                        "no gradients: the model has no trainable parameters on the loss path"
                    )
                loss_value = float(loss.detach())
        finally:
            for h in handles:
                h.remove()
    params = param_stats(named, module_owners(model), grads)
    sites = tuple(_freeze(s, examples) for s in recorder.sites)
    missing = None
    if scripted:
        missing = (
            "TorchScript model: per-layer activations are not visible (module hooks and "
            "function modes do not reach inside TorchScript); scan the Python model through "
            "an entry point (pkg.module:factory --weights FILE) to see them"
        )
        notes.append("TorchScript: weights and gradients only, no per-layer activations")
    return Capture(
        sites=sites,
        params=params,
        has_activations=instrument,
        has_gradients=grads is not None,
        loss=loss_value,
        mode=mode,
        examples=examples,
        notes=tuple(notes),
        missing_reason=missing,
    )


def _tensors_of(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _forward_error(exc: BaseException, frame: _Frame | None, inputs: Any) -> CaptureError:
    got = _shapes(inputs)
    shape_txt = ", ".join(str(s) for s in got) if got else "no tensors"
    where = "in the model's forward"
    if frame is not None:
        label = frame.name or "(root)"
        detail = type(frame.module).__name__
        extra = []
        for attr in (
            "in_features",
            "in_channels",
            "num_features",
            "normalized_shape",
            "embed_dim",
            "num_embeddings",
        ):
            if hasattr(frame.module, attr):
                extra.append(f"{attr}={getattr(frame.module, attr)}")
        if extra:
            detail += "(" + ", ".join(extra) + ")"
        fs = ", ".join(str(s) for s in frame.input_shapes) or "no tensors"
        where = f"in layer '{label}' [{detail}] on input of shape {fs}"
    if out_of_memory(exc):
        return CaptureError(
            f"out of memory in the forward pass ({where}): {first_line(exc)[:160]}; use a "
            f"smaller batch than {shape_txt} (--input-shape, --data) or more memory"
        )
    return CaptureError(
        f"the model {escaped(exc)} ({where}) "
        f"(batch inputs had shape {shape_txt}; check that --data/--input-shape fit the model)"
    )
