"""Whether the Hessian-vector products can be trusted, and one-line reasons when not.

Lanczos certifies eigenvalues of a symmetric operator. A double backward that is
silently wrong gives a different operator, and Lanczos still "converges" on it: a
softplus MLP whose custom autograd Function has its backward marked
``@once_differentiable`` gave lambda_max 1.601 with a bound of 1e-3 where the dense
Hessian's is 1.951. PyTorch raises nothing there: ``once_differentiable`` hangs the
second derivative on placeholder leaves that ``torch.autograd.grad(..., params)``
prunes, so those terms are just zero. Three checks, cheapest first:

* **the custom Functions' backwards** (no product): while the gradient graph is built,
  a hook on each custom Function node on the loss's graph sees what its backward got
  and returned. A result that does not depend, through autograd, on an incoming
  gradient that does (``@once_differentiable``, ``no_grad``, ``.detach()``, numpy or
  an extension kernel) drops terms from every product: refused, naming the Function
  and the layer whose forward created it (autograd sequence numbers around each
  module call). A result that depends on the incoming gradient but on nothing of the
  forward pass is right for a linear Function (a straight-through estimator, gradient
  scaling) and wrong for a nonlinear one whose backward detaches its saved input; such
  an operator stays symmetric, so the next check cannot see it. The Function is then
  re-run on its saved input and on a moved copy (input_dependence): a backward whose
  result changes almost everywhere is refused; one that is unchanged (or changes only
  at kinks) is measured; one that cannot be re-run gets a note.
* **symmetry** (two products more than Lanczos takes): for unit vectors u, v,
  S = sqrt(n) |u.Hv - v.Hu| / (|Hu| + |Hv|), the largest over three pairs (Lanczos's
  own start vector, whose product Lanczos reuses, and two random vectors). For random
  vectors S is about |H - H^T|_F / (2 |H|_F): how large the antisymmetric part is.
  On a symmetric operator only rounding of the products makes S nonzero: with a
  product error e, u.e is about |e| / sqrt(n) for a u independent of it, so S is about
  the products' relative rounding error. That error is measured rather than assumed
  (one product more, only when S is above the rounding floor of the parameters'
  dtype): H is linear, so |H(u+w) - Hu - Hw| / (|Hu| + |Hw|) is rounding alone. The
  operator is refused when S > SYMMETRY_TOL x that error. Measured (float32, CPU, torch
  2.13 and 2.14): on healthy models (MLPs, CNNs with BatchNorm, TransformerEncoders,
  ResNet-18 in train and eval mode, MLPs trained to a loss of 1e-6 whose products lose
  up to 2% to cancellation) S stayed within 3.1x the rounding error (ResNet-18: 10x the
  float32 epsilon, 1.2x its measured rounding error); on MLPs whose custom activation
  detaches its incoming gradient or is @once_differentiable, in any layer, it was 1.2e4x
  to 4.6e6x.
* **failures while taking products**: the user's backward raising (any exception,
  ``sys.exit``, a BaseException; never KeyboardInterrupt), an op without a second
  derivative, or an allocation failure become a NoCurvature naming what happened, where,
  and what to do: NH401 is skipped, the other checks stand.
"""

from __future__ import annotations

import inspect
import math
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import nn
from torch.autograd.function import BackwardCFunction, once_differentiable

from nnhealth._util import escaped, first_line, tensors_in
from nnhealth.curvature import vectors
from nnhealth.curvature.lanczos import NonFiniteProduct

SYMMETRY_TOL = 50.0  # allowed asymmetry S, in units of the products' own rounding error
_PAIR_SEED = 104_729  # offset from the scan's seed for the random vectors of the test
_WALK_LIMIT = 100_000  # nodes visited to classify one backward's result (then: no verdict)
_ONCE_CODE = once_differentiable(lambda ctx, *grads: grads).__code__  # every wrapper's
_DELAYED_ERROR = "torch::autograd::Error"  # the node once_differentiable hangs results on


def user_frame(exc: BaseException) -> str:
    """Where user code raised: ``SoftplusFn.backward (model.py:31)``, the innermost
    frame outside torch and nnhealth ('' when there is none)."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    found = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        path = frame.f_code.co_filename
        if not path.startswith(skip):
            found = f"{frame.f_code.co_qualname} ({os.path.basename(path)}:{lineno})"
    return found


def user_failure(what: str, exc: BaseException, functions: list[CustomFunction], hint: str) -> str:
    """One line for user code that raised during ``what``; ``hint`` says what to do."""
    where = user_frame(exc)
    layer = ""
    for f in functions:  # the custom Function whose backward that frame is, if any
        if where.startswith(f"{f.qualname}.") and f.where:
            layer = f", a custom autograd Function used in {f.where}"
            break
    at = f" in {where}{layer}" if where else ""
    return f"{what} {escaped(exc)}{at}" + (f"; {hint}" if hint else "")


def oom_reason(what: str, exc: BaseException, *, lanczos: bool = True) -> str:
    advice = (
        "lower --hessian-budget (fewer Lanczos vectors held), --hessian-top or "
        "--hessian-trace, use a smaller batch, or scan with more free memory"
        if lanczos
        else "the graph kept for Hessian products is larger than the scan's own pass: use "
        "a smaller batch, or scan with more free memory"
    )
    return f"out of memory {what} ({first_line(exc)[:120]}): {advice}"


# -- the graph --------------------------------------------------------------------------


def forward_graph(loss: torch.Tensor) -> tuple[set[Any], list[Any]]:
    """Every autograd node the loss depends on, and the custom Function nodes among
    them (in creation order)."""
    seen: set[Any] = set()
    custom = []
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node, BackwardCFunction):
            custom.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    custom.sort(key=lambda n: n._sequence_nr())
    return seen, custom


class ModuleSpans:
    """Which module's forward created an autograd node. Every node created in a thread
    takes the next autograd sequence number; forward pre/post hooks read it (from a
    probe view) around each module call, and a node belongs to the innermost call whose
    span holds its number. Hooks are removed on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.spans: list[tuple[str, str, int, int]] = []
        self._open: dict[int, list[int]] = {}
        self._handles: list[Any] = []
        self._probe = torch.zeros((), requires_grad=True)

    def _mark(self) -> int:
        with torch.enable_grad():
            return self._probe.view(()).grad_fn._sequence_nr()

    def __enter__(self) -> Self:
        if isinstance(self.model, torch.jit.ScriptModule):
            return self  # no hooks there; and no custom Functions either
        try:
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._pre(module)))
                self._handles.append(module.register_forward_hook(self._post(name, module)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module: nn.Module) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            self._open.setdefault(id(module), []).append(self._mark())

        return hook

    def _post(self, name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, _out: Any) -> None:
            starts = self._open.get(id(module))
            if starts:
                self.spans.append((name, type(module).__name__, starts.pop(), self._mark()))

        return hook

    def where(self, node: Any) -> str:
        """``layer 'features.3' [Act]``, ``the model's own forward [Net]``, ``the loss
        function``, or '' (unknown)."""
        seq = node._sequence_nr()
        holding = [s for s in self.spans if s[2] < seq < s[3]]
        if not holding:
            ends = [s[3] for s in self.spans if s[0] == ""]
            return "the loss function" if ends and seq > max(ends) else ""
        name, kind, _, _ = min(holding, key=lambda s: s[3] - s[2])
        return f"layer '{name}' [{kind}]" if name else f"the model's own forward [{kind}]"


@dataclass(frozen=True)
class CustomFunction:
    """A custom autograd Function on the loss's graph and what its backward did."""

    name: str  # the Function's class name
    qualname: str  # for matching a traceback frame to its backward
    where: str  # the layer whose forward created it ('' unknown)
    # None: fine; "once", "cut", "dependent": refused; "constant": taken as linear, a note
    verdict: str | None
    once_differentiable: bool


def _forward_cls(node: Any) -> type:
    return getattr(node, "_forward_cls", type(node))


def _reach(start: Any, incoming: set[Any], forward: set[Any]) -> tuple[bool, bool, bool] | None:
    """From a backward result's node: does it reach an incoming gradient, the forward
    graph, a once_differentiable placeholder? (None: too large to tell.)"""
    reach_in = reach_fwd = once = False
    seen: set[Any] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if len(seen) > _WALK_LIMIT:
            return None
        if node in incoming:
            reach_in = True
        elif node in forward:
            reach_fwd = True
        else:
            once = once or node.name() == _DELAYED_ERROR
            stack.extend(nxt for nxt, _ in node.next_functions)
    return reach_in, reach_fwd, once


def classify(grad_inputs: tuple, grad_outputs: tuple, forward: set[Any]) -> str | None:
    """What a custom backward did, from what it got (``grad_outputs``) and returned:
    "once" or "cut" (a result independent of the incoming gradients that depend on the
    parameters), "constant" (a result independent of the forward pass), None (fine, or
    no verdict: with several outputs, some incoming gradients constant and nonzero, a
    result may rightly depend on those alone)."""
    got = _Incoming(grad_outputs)
    verdict = None
    for r in grad_inputs:
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            continue
        v = _result_verdict(r, got, forward)
        if v in ("once", "cut"):
            return v
        verdict = verdict or v
    return verdict


class _Incoming:
    """The incoming gradients a custom backward got: those that carry a graph (they
    depend on the parameters, in a double backward) and their nodes. ``strict``: every
    incoming gradient carries one or is zero, so each result must reach one of them."""

    def __init__(self, grad_outputs: tuple) -> None:
        tensors = [g for g in grad_outputs if isinstance(g, torch.Tensor) and g.is_floating_point()]
        self.live = [g for g in tensors if g.requires_grad]
        self.nodes = {g.grad_fn for g in self.live if g.grad_fn is not None}
        self.strict = bool(self.live) and not any(
            not g.requires_grad and bool(g.detach().any()) for g in tensors
        )


def _result_verdict(r: torch.Tensor, got: _Incoming, forward: set[Any]) -> str | None:
    """The verdict on one floating-point result of the backward (see classify)."""
    if not r.requires_grad:
        if not bool(r.detach().any()):
            return None  # exactly zero: nothing to differentiate
        if got.strict:
            return "cut"
        return None if got.live else "constant"
    reached = _reached(r, got, forward)
    if reached is None:
        return None
    reach_in, reach_fwd, once = reached
    if once:
        return "once"
    if got.strict and not reach_in:
        return "cut"
    if not reach_fwd and (reach_in or not got.live):
        return "constant"
    return None


def _reached(r: torch.Tensor, got: _Incoming, forward: set[Any]) -> tuple[bool, bool, bool] | None:
    """_reach from a result that carries a graph; an incoming gradient passed through as
    it is reaches only itself, a leaf only the forward pass."""
    if any(r is g for g in got.live):
        return (True, False, False)
    if r.grad_fn is None:
        return (False, True, False)
    return _reach(r.grad_fn, got.nodes, forward)


class BackwardAudit:
    """Hooks on the custom Function nodes while the gradient graph is built: what each
    backward got and returned, classified after the backward (no hook does work)."""

    def __init__(self, nodes: list[Any]) -> None:
        self.nodes = nodes
        self.calls: list[tuple[Any, tuple, tuple]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        for node in self.nodes:
            self._handles.append(node.register_hook(self._recorder(node)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _recorder(self, node: Any) -> Callable[[tuple, tuple], None]:
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            self.calls.append((node, tuple(grad_inputs), tuple(grad_outputs)))

        return hook

    def report(
        self, forward: set[Any], spans: ModuleSpans, seed: int = 0, *, rerun: bool = True
    ) -> list[CustomFunction]:
        """What each Function's backward did (re-running those that look linear, see
        input_dependence, unless not ``rerun``), and where it was created."""
        verdicts: dict[Any, str | None] = {}
        for node, grad_inputs, grad_outputs in self.calls:
            v = classify(grad_inputs, grad_outputs, forward)
            if verdicts.get(node) in (None, "constant"):
                verdicts[node] = v or verdicts.get(node)
        self.calls.clear()
        out = []
        tried: dict[type, str | None] = {}  # one re-run per Function class
        for node in self.nodes:
            cls = _forward_cls(node)
            verdict = verdicts.get(node)
            if verdict == "constant" and rerun:
                if cls not in tried:
                    dependent = input_dependence(node, seed)
                    tried[cls] = {True: "dependent", False: None}.get(dependent, "constant")
                verdict = tried[cls]
            out.append(
                CustomFunction(
                    name=cls.__name__,
                    qualname=cls.__qualname__,
                    where=spans.where(node),
                    verdict=verdict,
                    once_differentiable=getattr(cls.backward, "__code__", None) is _ONCE_CODE,
                )
            )
        return out


_STEP = 1e-3  # the input perturbation of input_dependence, relative to its mean size
_CHANGED = 0.05  # more entries than this changing: the backward depends on the input


def _single_input(cls: type) -> bool:
    """``cls.forward`` takes one required argument (besides ctx, unless the Function
    has a separate setup_context)."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    if getattr(cls, "setup_context", None) is torch.autograd.Function.setup_context:
        params = params[1:]  # the old style: forward(ctx, ...)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    return len(required) == 1 and not any(
        p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
        for p in params
    )


def input_dependence(node: Any, seed: int = 0) -> bool | None:
    """Does a custom backward that autograd sees as independent of the Function's input
    (the "constant" verdict) depend on it all the same? The Function is applied again
    to its saved input and to a copy moved by _STEP, and its backward run on both with
    one random incoming gradient: a straight-through, linear or gradient-scaling
    Function gives the same result (or one that changes only where the step crosses a
    kink, as a hand-written ReLU's mask does); a nonlinear Function whose backward
    detaches its saved input gives a different one almost everywhere. A backward that
    is given no tensor of the forward pass (nothing saved, no tensor on ctx) cannot
    depend on the input at all. True: it depends (the double backward misses its second
    derivative); False: it does not; None: cannot tell (more than one input, the input
    not among the saved tensors, extra arguments, or it raised)."""
    try:
        saved = node.saved_tensors
    except RuntimeError:  # freed
        return None
    held = [v for v in vars(node).values() if tensors_in(v)]
    if not any(isinstance(t, torch.Tensor) for t in saved) and not held:
        return False  # the backward sees no tensor of the forward: it cannot depend on one
    cls = _forward_cls(node)
    x = _rerunnable_input(node, cls, saved)
    if x is None:
        return None
    base = x.detach()
    gen = torch.Generator(device="cpu").manual_seed(seed + _PAIR_SEED + 1)
    scale = float(base.abs().mean()) or 1.0
    step = torch.randn(base.shape, generator=gen, dtype=torch.float64).to(base) * (_STEP * scale)
    rerun = _Rerun(cls, seed, gen)
    try:
        r0, r1 = rerun.backward_at(base), rerun.backward_at(base + step)
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 (the user's Function re-run: it cannot tell)
        return None
    if r0 is None or r1 is None or r0.shape != r1.shape:
        return None
    return _changed_almost_everywhere(r0, r1)


def _rerunnable_input(node: Any, cls: type, saved: tuple) -> torch.Tensor | None:
    """The Function's one input, found among its saved tensors, when the Function can be
    applied again to a new value of it (one input, no other required argument)."""
    edges = [e for e, _ in node.next_functions if e is not None]
    if len(edges) != 1 or not _single_input(cls):
        return None
    x = next((t for t in saved if isinstance(t, torch.Tensor) and t.grad_fn is edges[0]), None)
    if x is None or not x.is_floating_point() or x.numel() == 0:
        return None
    return x


class _Rerun:
    """The Function applied to a fresh leaf, its backward run with one random incoming
    gradient (drawn from ``gen`` on the first call, the same for every call after)."""

    def __init__(self, cls: type, seed: int, gen: torch.Generator) -> None:
        self.cls, self.seed, self.gen = cls, seed, gen
        self.incoming: torch.Tensor | None = None

    def backward_at(self, value: torch.Tensor) -> torch.Tensor | None:
        """The gradient with respect to the input at ``value`` (None: not one output)."""
        leaf = value.clone().requires_grad_(True)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.default_generator.manual_seed(self.seed)
            outs = [
                o
                for o in tensors_in(self.cls.apply(leaf))
                if o.is_floating_point() and o.requires_grad
            ]
            if len(outs) != 1:
                return None
            if self.incoming is None:
                g = torch.randn(outs[0].shape, generator=self.gen, dtype=torch.float64)
                self.incoming = g.to(outs[0])
            (r,) = torch.autograd.grad(outs[0], leaf, self.incoming, allow_unused=True)
        return torch.zeros_like(leaf) if r is None else r.detach()


def _changed_almost_everywhere(r0: torch.Tensor, r1: torch.Tensor) -> bool:
    """More than _CHANGED of the entries that are nonzero in either result differ by
    more than rounding."""
    live = (r0 != 0) | (r1 != 0)
    tiny = 8 * torch.finfo(r0.dtype).eps * torch.maximum(r0.abs(), r1.abs())
    changed = ((r1 - r0).abs() > tiny) & live
    return int(changed.sum()) > _CHANGED * max(int(live.sum()), 1)


def listing(functions: list[CustomFunction], limit: int = 3) -> str:
    """``SoftplusFn (layers '1', '3' [Act])``: each Function once, with where it ran."""
    groups: dict[str, list[str]] = {}
    for f in functions:
        wheres = groups.setdefault(f.name, [])
        if f.where and f.where not in wheres:
            wheres.append(f.where)
    parts = []
    for name, wheres in groups.items():
        more = f" and {len(wheres) - limit} more" if len(wheres) > limit else ""
        kinds = {w.rsplit(" [", 1)[-1] for w in wheres if w.startswith("layer '")}
        if len(wheres) > 1 and len(kinds) == 1 and all(w.startswith("layer '") for w in wheres):
            layers = ", ".join(w.split("'")[1].join("''") for w in wheres[:limit])
            parts.append(f"{name} (layers {layers}{more} [{kinds.pop()})")
        elif wheres:
            parts.append(f"{name} ({'; '.join(wheres[:limit])}{more})")
        else:
            parts.append(name)
    return ", ".join(parts[:limit]) + (
        f" and {len(parts) - limit} more" if len(parts) > limit else ""
    )


FIX = (
    "write its backward with differentiable torch operations (no @once_differentiable, "
    "torch.no_grad() or .detach()) to measure curvature"
)


def refusal(functions: list[CustomFunction]) -> str | None:
    """The reason to refuse the operator, from the custom Functions' verdicts."""
    once = [f for f in functions if f.verdict == "once"]
    cut = [f for f in functions if f.verdict == "cut"]
    dependent = [f for f in functions if f.verdict == "dependent"]
    if once:
        return (
            f"Hessian-vector products would be wrong: the backward of custom autograd "
            f"Function {listing(once)} is marked @once_differentiable, so the double "
            f"backward silently drops its second-derivative terms; {FIX}"
        )
    if cut:
        return (
            f"Hessian-vector products would be wrong: the backward of custom autograd "
            f"Function {listing(cut)} does not differentiate through the gradient it "
            "receives (it runs under torch.no_grad(), detaches, or leaves torch), so the "
            f"double backward silently drops terms; {FIX}"
        )
    if dependent:
        return (
            f"Hessian-vector products would be wrong: the backward of custom autograd "
            f"Function {listing(dependent)} changes with its input (re-run on a moved "
            "input) but not through autograd (it .detach()es its saved input, or leaves "
            f"torch), so the double backward silently drops its second derivative; {FIX}"
        )
    return None


def linear_note(functions: list[CustomFunction]) -> str | None:
    constant = [f for f in functions if f.verdict == "constant"]
    if not constant:
        return None
    once = (
        " (it is marked @once_differentiable)"
        if any(f.once_differentiable for f in constant)
        else ""
    )
    return (
        f"the backward of custom autograd Function {listing(constant)} does not depend on "
        f"its input through autograd{once}, and re-running it could not tell whether it "
        "depends on it otherwise: NH401 takes its second derivative as zero, right for a "
        "straight-through or linear Function, wrong for a nonlinear one whose backward "
        "detaches what it saved"
    )


# -- symmetry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Symmetry:
    asymmetry: float  # S, the largest over the pairs (about |H - H^T|_F / 2|H|_F)
    rounding: float  # the products' relative rounding error (measured, or the floor)
    products: int  # products the test took (Lanczos's start vector's not counted)

    @property
    def symmetric(self) -> bool:
        return not self.asymmetry > SYMMETRY_TOL * self.rounding


def _pair(n: int, a_hb: float, b_ha: float, norm_ha: float, norm_hb: float) -> float:
    """S for one pair from a.Hb, b.Ha and the products' norms."""
    scale = norm_ha + norm_hb
    if scale == 0 or not math.isfinite(scale):
        return 0.0
    return math.sqrt(n) * abs(a_hb - b_ha) / scale


def check_symmetry(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    u: torch.Tensor,
    hu: torch.Tensor,
    *,
    dtypes: Iterator[torch.dtype] | list[torch.dtype],
    seed: int = 0,
    floor: float = 0.0,
) -> Symmetry:
    """S over the pairs (u, v), (u, w), (v, w): ``u`` a unit vector whose product ``hu``
    is known, v and w random unit vectors. The rounding floor: the parameters' dtype's
    machine epsilon, n float64 epsilons for the dot products themselves, and ``floor``
    (the S that the products' known error can explain: finite differences).

    Vectors are in ``u``'s dtype, dot products accumulated in float64. At most five
    vectors are held at once (u, hu, one random vector, the product being taken and its
    pieces; six when rounding is measured): a random vector is drawn again from its
    seed rather than kept, and a product is dropped once its dot products are taken."""

    def random(which: int) -> torch.Tensor:  # v: 0, w: 1, of one generator's sequence
        gen = torch.Generator(device="cpu").manual_seed(seed + _PAIR_SEED)
        return vectors.random_unit(n, gen, u.dtype, u.device, skip=which)

    def product(x: torch.Tensor, i: int) -> torch.Tensor:
        hx = matvec(x).to(u.dtype)
        if not bool(torch.isfinite(hx).all()):
            raise NonFiniteProduct(f"product {i} of the operator is not finite")
        return hx

    norm_hu = vectors.norm(hu)
    v = random(0)
    hv = product(v, 2)
    norm_hv = vectors.norm(hv)
    s_uv = _pair(n, vectors.dot(u, hv), vectors.dot(v, hu), norm_hu, norm_hv)
    del v
    w = random(1)
    w_hv = vectors.dot(w, hv)
    del hv
    hw = product(w, 3)
    norm_hw = vectors.norm(hw)
    s_uw = _pair(n, vectors.dot(u, hw), vectors.dot(w, hu), norm_hu, norm_hw)
    del w
    s = max(s_uv, s_uw, _pair(n, vectors.dot(random(0), hw), w_hv, norm_hv, norm_hw))
    floor = max(
        [torch.finfo(d).eps for d in dtypes] + [n * torch.finfo(torch.float64).eps, floor],
    )
    if s <= SYMMETRY_TOL * floor:
        return Symmetry(s, floor, 2)
    # H is linear: H(u + w) - Hu - Hw is rounding alone
    total = hw.add_(hu)
    defect = product(random(1).add_(u), 4).sub_(total)
    scale = norm_hu + norm_hw
    rounding = vectors.norm(defect) / scale if scale else 0.0
    return Symmetry(s, max(floor, rounding), 3)


def asymmetry_reason(sym: Symmetry, functions: list[CustomFunction]) -> str:
    head = (
        f"Hessian-vector products are not symmetric: u·Hv and v·Hu differ (an antisymmetric "
        f"part of about {sym.asymmetry:.2g} of the operator, {sym.asymmetry / sym.rounding:.0f}x "
        "what rounding of the products explains), so a double backward here is wrong and "
        "lambda_max cannot be certified; "
    )
    if functions:
        return head + f"suspect the custom autograd Function {listing(functions)}: {FIX}"
    return head + (
        "no custom autograd Function is on the loss's graph: look for gradient hooks "
        "(register_hook) that change gradients, or an op with a wrong second derivative"
    )
