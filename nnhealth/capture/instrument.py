"""The one instrumented forward/backward pass.

Two mechanisms, both removed in ``finally``:

* forward pre/post hooks on every submodule keep an ordered stack of the modules that
  are running (so a functional call is named after the module it ran in, and a failure
  after the innermost module that raised), and reduce each parametric layer's output;
* a ``TorchFunctionMode`` sees every nonlinearity however it is written: ``nn.ReLU``,
  ``nn.ReLU(inplace=True)``, ``F.relu``, ``torch.tanh``, ``x.sigmoid()``.

Each output is reduced on the spot by the reducers the plan switches on (reducers.py:
moments, per-unit counters, fingerprints); gradients w.r.t. each output are reduced by
tensor hooks during the backward. No activation tensor is kept. Gradients are taken
with ``torch.autograd.grad`` so the caller's ``.grad`` fields are never touched.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nnhealth import nonlinearities
from nnhealth._util import escaped, first_line, out_of_memory, tensors_in
from nnhealth.capture.activations import build_table, spec
from nnhealth.capture.params import module_owners, param_stats
from nnhealth.capture.precision import dtype_name, readable
from nnhealth.capture.recurrent import RECURRENT_TYPES, GateRecorder
from nnhealth.capture.reducers import GradientMoments, Output, Reducer, switched_on
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
    activation_kind,
    is_activation_module,
    is_norm,
    is_torch_activation,
)
from nnhealth.errors import CaptureError, flag

if TYPE_CHECKING:
    from nnhealth.loading.batch import Batch
    from nnhealth.plan import Plan

GATES_FN = ("sigmoid", "tanh")  # the functions of recurrent gates


def _first_tensor(obj: Any) -> torch.Tensor | None:
    found = tensors_in(obj)
    return found[0] if found else None


def _shapes(args: Any) -> list[list[int]]:
    return [list(t.shape) for t in tensors_in(args)]


@dataclass
class _Site:
    """One site while the pass runs: the fields that name and shape it (SiteStats'),
    and its reducers."""

    identity: dict[str, Any]
    reducers: list[Reducer]
    ptr: int  # the output's storage: finds the model's output among the sites
    is_output: bool = False
    # the output itself, weakly: while it lives, no other tensor can reuse its memory
    alive: Callable[[], torch.Tensor | None] = lambda: None

    def freeze(self, examples: int) -> SiteStats:
        values = {**self.identity, "examples": examples, "is_output": self.is_output}
        for reducer in self.reducers:
            values.update(reducer.freeze())
        return SiteStats(**values)


@dataclass
class _Frame:
    name: str
    module: nn.Module
    input_shapes: list[list[int]] = field(default_factory=list)
    # a nonlinearity module: the first tracked op inside it (its output is recorded once,
    # as the module's kind, not the ops it is written with)
    activation: bool = False
    inner: ActivationSpec | None = None
    input_ptr: int | None = None  # the first input's storage: which site it came from


class _Recorder:
    def __init__(self, model: nn.Module, plan: Plan, examples: int) -> None:
        self.model = model
        # without a saturation request the bounds are never compared against: any will do
        fraction = plan.saturation_derivative
        self.fraction = 0.0 if fraction is None else fraction
        self.table = build_table(self.fraction)
        self._activation_types: dict[type, tuple[bool, ActivationSpec | None]] = {}
        self.reducers = switched_on(plan)
        self.keep_grads = plan.gradients
        self.seed = plan.seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._probe_cache: dict[tuple, torch.Tensor] = {}
        self.stack: list[_Frame] = []
        self.sites: list[_Site] = []
        self._latest_at: dict[int, _Site] = {}  # data_ptr -> the latest site output there
        self.calls: Counter[str] = Counter()
        self.busy = False
        self.done = False  # set once the forward has returned
        self.channels: int | None = None  # channel count of the last channel-first layer
        self.grad_events = 0
        self.failure: _Frame | None = None
        self.examples = examples
        self.gates: GateRecorder | None = None
        if plan.saturation_derivative is not None:
            bounds = {k: nonlinearities.NONLINEARITIES[k].bounds(self.fraction) for k in GATES_FN}
            self.gates = GateRecorder(bounds)

    def gate_hook(self, name: str) -> Callable:
        """Forward hook of a recurrent module: its gates, recomputed (recurrent.py)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.done or self.gates is None:
                return
            self.busy = True  # the recomputation's sigmoids are not the model's
            try:
                self.gates.on_call(name, module, args, kwargs)
            except Exception as exc:  # noqa: BLE001 (an input layout we cannot read)
                self.gates.notes.append(f"{name}: gates not measured ({first_line(exc)[:120]})")
            finally:
                self.busy = False

        return hook

    # ---- module stack ---------------------------------------------------------------
    def pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.done:  # hooks also fire in checkpoint recomputation during backward
                native, by_name = self._activation_type(module)
                is_act = native or by_name is not None
                first = _first_tensor(args)
                ptr = None if first is None else first.data_ptr()
                self.stack.append(_Frame(name, module, _shapes(args), is_act, input_ptr=ptr))

        return hook

    def _activation_type(self, module: nn.Module) -> tuple[bool, ActivationSpec | None]:
        """(a torch.nn activation module, the spec of the kind its class name says)."""
        cls = type(module)
        if cls not in self._activation_types:
            kind = activation_kind(module)
            entry = nonlinearities.lookup(kind)
            by_name = None if entry is None else spec(entry, self.fraction)
            self._activation_types[cls] = (is_torch_activation(module), by_name)
        return self._activation_types[cls]

    def post_hook(self, name: str, tracked: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.done:
                return
            frame = None
            if self.stack and self.stack[-1].module is module:
                frame = self.stack.pop()
            if frame is not None and frame.activation:
                self._module_activation(frame, output)
                return
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
            reads = None if frame is None else self._site_of(frame.input_ptr)
            self.record(out, name, type(module).__name__, role, False, channel_first)
            if self.sites and self.sites[-1].identity["module"] == name:
                self.sites[-1].identity["reads"] = reads

        return hook

    def _site_of(self, ptr: int | None) -> str | None:
        """The latest site whose output lives at ``ptr`` (a module's input read directly
        from another site's output, not through a sum or a reshape that copies)."""
        if ptr is None:
            return None
        site = self._latest_at.get(ptr)
        # a dead output's memory may hold another tensor now (a sum's result)
        return None if site is None or site.alive() is None else site.identity["name"]

    def mark_output(self, out: torch.Tensor | None) -> None:
        """Flag the last site whose output is the model's output (it feeds the loss)."""
        if out is None:
            return
        for site in reversed(self.sites):
            if site.ptr == out.data_ptr() and site.identity["shape"] == tuple(out.shape):
                site.is_output = True
                return

    def record_failure(self) -> None:
        if self.stack and self.failure is None:
            self.failure = self.stack[-1]

    # ---- activations --------------------------------------------------------------
    def _on_batch(self, out: torch.Tensor) -> bool:
        """Whether a nonlinearity's output is of the batch (not of parameters: a learned
        gate), seen during the forward."""
        return not self.done and out.ndim > 0 and self.examples in tuple(out.shape)

    def _channel_first(self, out: torch.Tensor) -> bool:
        return self.channels is not None and out.ndim >= 3 and out.shape[1] == self.channels

    def on_activation(self, spec: ActivationSpec, out: torch.Tensor) -> None:
        if self.stack and self.stack[-1].activation:
            top = self.stack[-1]  # inside nn.GELU, NewGELUActivation...: the module's output
            top.inner = top.inner or spec
            return
        if not self._on_batch(out):
            return
        owner = self.stack[-1].name if self.stack else ""
        base = f"{owner or '(root)'}:{spec.kind}"
        self.record(out, base, spec.kind, ACTIVATION, True, self._channel_first(out), spec)

    def _module_activation(self, frame: _Frame, output: Any) -> None:
        """One site for a nonlinearity module's output, of the kind its class names (a
        torch.nn one: of the op it called, whose arguments set its bounds: ReLU6)."""
        native, by_name = self._activation_type(frame.module)
        chosen = frame.inner if native else by_name
        out = _first_tensor(output)
        if chosen is None or out is None or not self._on_batch(out):
            return
        functional = not frame.name  # the model itself is the nonlinearity
        base = f"(root):{chosen.kind}" if functional else frame.name
        self.record(
            out, base, chosen.kind, ACTIVATION, functional, self._channel_first(out), chosen
        )

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
        """Reduce one output with the plan's reducers that apply to it; the gradient
        w.r.t. it is reduced when the backward reaches it."""
        if not readable(out) or out.numel() == 0:
            return
        self.calls[base] += 1
        n_call = self.calls[base]
        self.busy = True
        try:
            with torch.no_grad():
                view = Output(out, channel_first, role, spec, self._probes)
                reducers: list[Reducer] = [r() for r in self.reducers if r.wanted(view)]
                for reducer in reducers:
                    reducer.update(view)
            identity = {
                "name": base if n_call == 1 else f"{base}#{n_call}",
                "module": base.split(":")[0] if functional else base,
                "kind": kind,
                "role": role,
                "functional": functional,
                "order": len(self.sites),
                "shape": tuple(out.shape),
                "unit_dim": view.unit_dim,
                "spec": spec,
                "units": view.units,
                "per_unit_count": view.per_unit_count,
                "dtype": dtype_name(out.dtype),
                "eps": float(torch.finfo(out.dtype).eps),
            }
            site = _Site(identity, reducers, out.data_ptr(), alive=weakref.ref(out))
            self.sites.append(site)
            self._latest_at[site.ptr] = site
            if self.keep_grads and out.requires_grad:
                grads = GradientMoments()
                reducers.append(grads)
                out.register_hook(self._grad_hook(grads))
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

    def _grad_hook(self, grads: GradientMoments) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            first = grads.order is None
            grads.update(grad, self.grad_events)
            self.grad_events += first

        return hook


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


def call_model(model: nn.Module, inputs: Any) -> Any:
    """model(x), model(*inputs) or model(**inputs), by the batch's structure."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


LossFactory = Callable[[Any], torch.Tensor]


Grads = dict[str, torch.Tensor | None]
GradReduce = Callable[[Grads], Grads]


class Observation:
    """The statistics of a pass the caller runs itself (nnhealth.Monitor: the user's own
    forward and backward in a training loop), as run_pass would record them: entered,
    the recorder's module hooks and activation mode are attached; the forward they see
    ends when the model's own call returns, and the backward that follows reduces the
    gradients at each output (tensor hooks that read, never alter). On exit every hook is
    removed and the mode is left. ``loss``: the loss value, when the caller gives it. The
    parameter gradients are read from ``.grad`` by run_pass(observed=...).
    ``examples`` None (``batch_from_call``): the batch is the model's call's arguments,
    its size their first tensor's first axis (called() gives them as a Batch)."""

    def __init__(
        self, model: nn.Module, plan: Plan, examples: int | None, *, batch_from_call: bool = False
    ) -> None:
        self.model = model
        self.recorder = _Recorder(model, plan, -1 if examples is None else examples)
        self.loss: float | None = None
        self.mode = "train" if model.training else "eval"
        # as run_pass: activations only when the plan asks, never inside TorchScript
        self.instrument = plan.activations and not isinstance(model, torch.jit.ScriptModule)
        self._from_call = batch_from_call or examples is None
        self._call: tuple[tuple, dict] | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> Self:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(_hooked(self.model, self.recorder, self.instrument))
            if self._from_call:
                handle = self.model.register_forward_pre_hook(self._called, with_kwargs=True)
                stack.callback(handle.remove)
            handle = self.model.register_forward_hook(self._returned)
            stack.callback(handle.remove)
            if self.instrument:
                stack.enter_context(_ActivationMode(self.recorder))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _called(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The model's first call: its arguments are the batch (kept by reference)."""
        if self._call is None and not self.recorder.done:
            self._call = (args, kwargs)
            first = _first_tensor((args, kwargs))
            if first is not None and first.ndim:
                self.recorder.examples = int(first.shape[0])

    def called(self) -> Batch:
        """The batch the model was called on (for a batch taken from the call)."""
        from nnhealth.errors import UsageError
        from nnhealth.loading.batch import Batch

        if self._call is None:
            raise UsageError(
                "the model was not called during the step: nothing was observed (pass the "
                "batch to monitor.step, and call the model inside the with block)"
            )
        args, kwargs = self._call
        # the Trainer's token count of a whole accumulated step would scale the loss of
        # this one batch (Hugging Face's num_items_in_batch): the batch's own mean instead
        kwargs = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
        if kwargs and not args:
            inputs: Any = dict(kwargs)
        else:
            inputs = args[0] if len(args) == 1 else tuple(args)
        return Batch(inputs=inputs, targets=None, source="the model's call in the step")

    def _returned(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The model's call returned: the forward is over (later calls, a second forward
        in the same step, are not recorded)."""
        if not self.recorder.done:
            self.recorder.done = True
            self.recorder.mark_output(_first_tensor(output))

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def run_pass(
    model: nn.Module,
    inputs: Any,
    make_loss: LossFactory,
    plan: Plan,
    *,
    examples: int,
    reduce_grads: GradReduce | None = None,
    observed: Observation | None = None,
) -> Capture:
    """One forward (+ backward) of ``model`` on ``inputs`` as ``plan`` describes it;
    returns frozen statistics. ``examples``: the batch's size (a nonlinearity whose
    output has no axis of that size works on parameters, not on the batch).

    ``make_loss(output)`` turns the model's output into a scalar loss. Activations are
    reduced only when the plan asks for them, and not for TorchScript (no hooks reach
    inside it); the backward runs only when it asks for gradients. Raises
    ``CaptureError`` naming the innermost module that was running when the model raised.
    ``reduce_grads``: turns this process's parameter gradients into the ones the
    statistics are of (their weighted sum over the ranks of a distributed scan).
    ``observed``: a pass the caller ran (an exited Observation): its records, the
    parameters' ``.grad`` and its loss are taken, and nothing is run here.
    """
    if observed is not None:
        return _observed(model, plan, examples, observed)
    scripted = isinstance(model, torch.jit.ScriptModule)
    instrument = plan.activations and not scripted
    recorder = _Recorder(model, plan, examples)
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    notes: list[str] = []
    grads: dict[str, torch.Tensor | None] | None = None
    with (
        preserved_state(model, plan.mode),
        _seeded(model, plan.seed),
        torch.enable_grad(),
        _hooked(model, recorder, instrument),
    ):
        output = _forward(model, inputs, recorder, instrument)
        loss = make_loss(output)
        del output
        if plan.gradients and trainable and loss.requires_grad:
            grads = _backward(loss, trainable)
            if reduce_grads is not None:
                grads = reduce_grads(grads)
        elif plan.gradients:
            notes.append("no gradients: the model has no trainable parameters on the loss path")
        loss_value = float(loss.detach())
    missing = None
    if scripted:
        missing = (
            "TorchScript model: per-layer activations are not visible (module hooks and "
            "function modes do not reach inside TorchScript); scan the Python model through "
            "an entry point (pkg.module:factory --weights FILE) to see them"
        )
        notes.append("TorchScript: weights and gradients only, no per-layer activations")
    gates = recorder.gates
    if gates is not None:
        notes += gates.notes
    return Capture(
        gates=() if gates is None else gates.freeze(),
        sites=tuple(s.freeze(examples) for s in recorder.sites),
        params=param_stats(named, module_owners(model), grads, _update(plan)),
        has_activations=instrument,
        has_gradients=grads is not None,
        loss=loss_value,
        mode=plan.mode,
        examples=examples,
        notes=tuple(notes),
        missing_reason=missing,
    )


def _observed(model: nn.Module, plan: Plan, examples: int, observed: Observation) -> Capture:
    """The Capture of a pass the caller ran: its records, and ``.grad`` read as the
    parameters' gradients (none when its backward left them all unset)."""
    named = list(model.named_parameters())
    grads = {n: p.grad for n, p in named if p.requires_grad}
    seen = any(g is not None for g in grads.values())
    recorder = observed.recorder
    gates = recorder.gates
    notes = list(gates.notes) if gates is not None else []
    # outputs recorded with a graph but no gradient reached any: the backward ran
    # outside the step, and .grad is another step's (or zeros)
    stale = (
        observed.instrument
        and recorder.grad_events == 0
        and any(isinstance(r, GradientMoments) for s in recorder.sites for r in s.reducers)
    )
    if stale:
        seen = False
        notes.append(
            "no gradients: the backward did not run inside monitor.step (.grad holds "
            "another step's); put loss.backward() inside the with block"
        )
    elif not seen:
        notes.append("no gradients: the step's backward set no parameter's .grad")
    return Capture(
        gates=() if gates is None else gates.freeze(),
        sites=tuple(s.freeze(examples) for s in recorder.sites),
        params=param_stats(named, module_owners(model), grads if seen else None, _update(plan)),
        has_activations=observed.instrument,
        has_gradients=seen,
        loss=observed.loss,
        mode=observed.mode,
        examples=examples,
        notes=tuple(notes),
    )


def _update(plan: Plan) -> Callable | None:
    """The plan's optimizer step (for each parameter's update norm), when it has a rate
    and is not plain SGD (whose lr * ||g|| the checks take from the gradient norm)."""
    opt = plan.optimizer
    return None if opt is None or opt.lr is None or opt.plain_sgd else opt.update


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """The pass's random draws (dropout) from ``seed``; the caller's generators as they
    were afterwards."""
    device = next((p.device for p in _tensors_of(model)), torch.device("cpu"))
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        # seed exactly the generators fork_rng restores (torch.manual_seed would also
        # reseed every other accelerator and leave the caller's state changed there)
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _hooked(model: nn.Module, recorder: _Recorder, instrument: bool) -> Iterator[None]:
    """Module hooks on every submodule while the pass runs (none unless
    ``instrument``), removed in ``finally``."""
    handles = []
    try:
        if instrument:
            for mname, module in model.named_modules():
                tracked = next(module.parameters(recurse=False), None) is not None and (
                    not is_activation_module(module)  # PReLU: recorded as a nonlinearity
                )
                handles.append(module.register_forward_pre_hook(recorder.pre_hook(mname)))
                handles.append(module.register_forward_hook(recorder.post_hook(mname, tracked)))
                if recorder.gates is not None and isinstance(module, RECURRENT_TYPES):
                    hook = recorder.gate_hook(mname)
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, inputs: Any, recorder: _Recorder, instrument: bool) -> Any:
    """The model's output; a failure becomes a CaptureError naming where it raised."""
    try:
        with _ActivationMode(recorder) if instrument else contextlib.nullcontext():
            output = call_model(model, inputs)
        recorder.done = True
        recorder.mark_output(_first_tensor(output))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the user's model: sys.exit and BaseException too
        recorder.record_failure()
        raise _forward_error(exc, recorder.failure, inputs) from exc
    return output


def _backward(
    loss: torch.Tensor, trainable: list[tuple[str, torch.Tensor]]
) -> dict[str, torch.Tensor | None]:
    """d loss / d each trainable parameter, by ``autograd.grad`` (``.grad`` untouched)."""
    try:
        got = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a custom backward or tensor hook: user code
        raise CaptureError(
            f"the backward pass failed: {escaped(exc)} (a custom autograd "
            "Function's backward or a tensor hook)"
        ) from exc
    return {n: g for (n, _), g in zip(trainable, got, strict=True)}


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
            f"smaller batch than {shape_txt} ({flag('input_shape')}, {flag('data')}) or more memory"
        )
    return CaptureError(
        f"the model {escaped(exc)} ({where}) "
        f"(batch inputs had shape {shape_txt}; check that {flag('data')}/{flag('input_shape')} "
        "fit the model)"
    )
