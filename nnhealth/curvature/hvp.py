"""Hessian-vector products of the scan's loss w.r.t. the trainable parameters.

The loss and its gradient graph are built once (``create_graph=True``) and every product
is one more backward through that graph (``retain_graph=True``): measured on CPU that is
the cheapest correct way (1.35-2.6x a forward+backward per product, against 2.4-3.5x for
a fresh double backward and 2.7-5.8x for torch.func forward-over-reverse). The graph
also fixes the operator: the batch, and the mode BatchNorm ran in, are those of that one
forward. Dropout is switched off for it (a product must not resample masks); the model's
modes, buffers and RNG are restored afterwards.

While that graph is built, the backward of every custom autograd Function on it is
audited (trust.py): one that the double backward cannot differentiate refuses the
operator before any product; the scan also tests the products' symmetry before Lanczos
trusts them. A double backward that cannot be had or trusted (an op without a second
derivative, a custom backward refused by the audit or raising under create_graph, an
asymmetric operator) raises NoSecondDerivative: measure.py then takes the products by
finite differences of gradients (finite.py). Other user code that fails (the forward,
the loss, a backward on the Nth product) or memory that runs out becomes a NoCurvature
reason, never a crash; KeyboardInterrupt propagates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from nnhealth._util import first_line, out_of_memory
from nnhealth.capture.instrument import call_model
from nnhealth.capture.state import preserved_state
from nnhealth.curvature import trust
from nnhealth.errors import CaptureError, NnhealthError, flag

_NO_DOUBLE_BACKWARD = ("not implemented", "does not support double backward", "derivative for")
_DIFFERENTIABLE = (
    "Hessian-vector products differentiate every backward once more: make that code "
    "differentiable to measure curvature"
)


def _no_second_derivative(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _NO_DOUBLE_BACKWARD)


class _SeesAttention(TorchFunctionMode):
    """Whether the forward called scaled_dot_product_attention (for the report)."""

    def __init__(self) -> None:
        super().__init__()
        self.called = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # multi_head_attention_forward calls the kernel inside its own dispatch, which
        # a mode does not see
        if func in (F.scaled_dot_product_attention, F.multi_head_attention_forward):
            self.called = True
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


class NoCurvature(CaptureError):
    """No Hessian to measure or none to trust here (nothing trainable, a linear loss, a
    backward that cannot be differentiated, a failure while taking products): NH401 is
    skipped with this reason, the other checks stand."""


class NoSecondDerivative(NoCurvature):
    """The double backward cannot be had, or cannot be trusted, here: the operator can
    still be measured by finite differences of gradients (first derivatives only)."""


def enter_products(
    stack: contextlib.ExitStack, model: nn.Module, mode: str, seed: int, notes: list[str]
) -> None:
    """The model set up for taking products (restored when ``stack`` closes): the scan's
    mode, its buffers and RNG saved, dropout off (a product must not resample masks)."""
    stack.enter_context(preserved_state(model, mode))
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.default_generator.manual_seed(seed)
    # dropout modules, and attention's own dropout (MultiheadAttention applies it
    # functionally when training); functional dropout in a custom forward follows
    # its module's mode and cannot be switched off from here
    dropouts = [
        m
        for m in model.modules()
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention))
    ]
    for m in dropouts:
        m.training = False  # restored by preserved_state
    # and their rate, which attention kernels read from the module whatever its mode
    # (Hugging Face's GPT-2 and timm's ViT pass ``attn_dropout.p`` to
    # scaled_dot_product_attention while the attention module trains): rebuilding a
    # graph for each product (blocks.py) would otherwise draw new masks each time
    rates = [(m, m.p) for m in dropouts if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m, _ in rates:
        m.p = 0.0
    stack.callback(_restore_rates, rates)
    if dropouts and mode == "train":
        notes.append(f"dropout off while taking Hessian products ({len(dropouts)} modules)")


def _restore_rates(rates: list[tuple[nn.Module, float]]) -> None:
    for m, p in rates:
        m.p = p


class ProductOperator:
    """What every Hessian-vector product operator holds: the model, its inputs and loss,
    the mode and seed of the products, their count, notes, and the custom autograd
    Functions on the graph. Subclasses: HessianOperator (double backward) and
    finite.FiniteDifferenceOperator."""

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        make_loss: Callable[[Any], torch.Tensor],
        *,
        mode: str = "train",
        seed: int = 0,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.make_loss = make_loss
        self.mode = mode
        self.seed = seed
        # the parameters products are taken over, with their names (narrowed on entry to
        # those the loss differentiates; the optimizer's preconditioner is keyed by name)
        self.named: list[tuple[str, torch.Tensor]] = [
            (k, p) for k, p in model.named_parameters() if p.requires_grad
        ]
        self.params: list[torch.Tensor] = [p for _, p in self.named]
        self.n = sum(p.numel() for p in self.params)
        self.products = 0
        # sums a product or gradient over the ranks of a distributed scan, in place
        # (distributed.reduce_products sets it); None: this process's are the whole's
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.notes: list[str] = []
        self.functions: list[trust.CustomFunction] = []
        self._stack: contextlib.ExitStack | None = None

    def _summed(self, owned: torch.Tensor) -> torch.Tensor:
        """``owned`` (a tensor no one else holds) summed over the ranks, if any."""
        return owned if self.reduce is None else self.reduce(owned)


class HessianOperator(ProductOperator):
    """``matvec(v)`` = H v for the flat float64 vector ``v`` over the trainable params.

    Use as a context manager: the model is set up (mode, dropout off) on entry and
    restored on exit, where the retained graph is freed.
    """

    backend = "default"  # "math attention" when the forward used attention (see _build)

    asymmetry_floor = 0.0  # exact products: rounding alone (trust.check_symmetry)
    _grads: tuple[torch.Tensor, ...] | None = None  # the gradient graph, while entered

    def __enter__(self) -> Self:
        if not self.params:
            raise NoCurvature("the model has no trainable parameters: there is no Hessian")
        self._stack = contextlib.ExitStack()
        try:
            enter_products(self._stack, self.model, self.mode, self.seed, self.notes)
            self._prepare()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _prepare(self) -> None:
        """What entering does once the model is set up: build the graph."""
        self._build()

    def _forward_loss(
        self,
        spans: contextlib.AbstractContextManager[Any],
        inputs: Any = None,
        make_loss: Callable[[Any], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The model's forward and the loss, with graph, for the products (on the
        operator's inputs and loss, or on ``inputs`` and ``make_loss``)."""
        inputs = self.inputs if inputs is None else inputs
        make_loss = self.make_loss if make_loss is None else make_loss
        try:
            with spans:
                output = call_model(self.model, inputs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the user's model, with sys.exit and BaseException
            raise self._failure(
                "the model's forward for Hessian products",
                exc,
                "it ran in the scan's first pass: does the model keep state between calls, "
                f"or need more examples than the Hessian's ({flag('hessian_batch')})?",
            ) from exc
        try:
            return make_loss(output)
        except KeyboardInterrupt:
            raise
        except NnhealthError as exc:  # the loss's own one-line reason
            raise NoCurvature(f"the loss for Hessian products failed: {exc.message}") from exc
        except BaseException as exc:
            raise self._failure("the loss for Hessian products", exc, "") from exc

    def _build(self) -> None:
        """The loss and its gradient graph, kept for the products."""
        self._grads = self._keep(self._audited_grads())

    def _audited_grads(
        self, inputs: Any = None, make_loss: Callable[[Any], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | None, ...]:
        """The loss's gradient with graph (create_graph), one per parameter, after the
        audit of every custom backward on it (on the operator's inputs and loss, or on
        ``inputs`` and ``make_loss``). Attention runs on the math backend from the
        start: the fused scaled-dot-product kernels have no second derivative, and
        building with them first, failing on the first product and rebuilding held two
        graphs at once (ViT-B/16 at 4x224x224: a 1.2 GB higher peak)."""
        spans = trust.ModuleSpans(self.model)
        seen = _SeesAttention()
        with torch.enable_grad(), _math_attention():
            with seen:
                loss = self._forward_loss(spans, inputs, make_loss)
            if seen.called and self.backend != "math attention":
                self.backend = "math attention"
                self.notes.append(
                    "Hessian products used the math attention backend (the fused "
                    "scaled-dot-product attention kernels have no second derivative)"
                )
            self.loss = float(loss.detach())
            if not loss.requires_grad:
                raise NoCurvature(
                    "the loss does not depend on any trainable parameter through autograd (a "
                    "detached output, or one computed under torch.no_grad()?): there is no "
                    "Hessian to measure"
                )
            forward, custom = trust.forward_graph(loss)
            audit = trust.BackwardAudit(custom)
            try:
                with audit:
                    grads = torch.autograd.grad(
                        loss, self.params, create_graph=True, allow_unused=True
                    )
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a custom backward or a tensor hook: user code
                self.functions = audit.report(forward, spans, rerun=False)  # for names
                failure = self._failure(
                    "the backward for Hessian products (with create_graph)", exc, _DIFFERENTIABLE
                )
                if out_of_memory(exc):
                    raise failure from exc
                # the scan's own backward ran: this one fails for create_graph alone
                raise NoSecondDerivative(failure.message) from exc
            self.functions = audit.report(forward, spans, self.seed)
            del forward, audit
            reason = trust.refusal(self.functions)
            if reason:
                raise NoSecondDerivative(reason)
            note = trust.linear_note(self.functions)
            if note and note not in self.notes:
                self.notes.append(note)
            return grads

    def _keep(
        self, grads: tuple[torch.Tensor | None, ...], curved: list[bool] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Narrow the operator to the parameters with a second derivative: those whose
        gradient has a graph (or, given, those ``curved`` marks). Parameters the loss does
        not use, or uses only linearly, have zero Hessian rows: they are left out (and the
        notes say how many). The kept gradients, in the kept parameters' order."""
        if curved is None:
            curved = [g is not None and g.requires_grad for g in grads]
        kept = [i for i, c in enumerate(curved) if c]
        if not kept:
            raise NoCurvature("the loss is linear in every trainable parameter: H = 0")
        dropped = len(self.params) - len(kept)
        if dropped:
            self.notes.append(
                f"{dropped} parameter tensor(s) have no second derivative here (unused "
                "by the loss, or linear in it) and are left out of the Hessian"
            )
        self.named = [self.named[i] for i in kept]
        self.params = [p for _, p in self.named]
        self.n = sum(p.numel() for p in self.params)
        return tuple(grads[i] for i in kept)  # type: ignore[misc]

    def _failure(
        self, what: str, exc: BaseException, hint: str, *, building: bool = True
    ) -> NoCurvature:
        """User code (or memory) failed while building (or, not ``building``, using) the
        operator."""
        if out_of_memory(exc):
            return NoCurvature(trust.oom_reason(f"in {what}", exc, lanczos=not building))
        if isinstance(exc, RuntimeError) and "once_differentiable" in str(exc):
            once = [f for f in self.functions if f.once_differentiable] or self.functions
            named = f" ({trust.listing(once)})" if once else ""
            return NoSecondDerivative(
                f"{what} failed: {first_line(exc)}: a custom autograd Function's backward"
                f"{named} has no second derivative; {trust.FIX}"
            )
        if _no_second_derivative(exc):
            return NoSecondDerivative(
                f"{what} failed: an operation on the loss's graph has no second derivative "
                f"({first_line(exc)}); Hessian-vector products need one for every operation: "
                "use one that has it (a smooth activation, say) to measure curvature"
            )
        return NoCurvature(trust.user_failure(what, exc, self.functions, hint))

    def __exit__(self, *exc: object) -> None:
        self._grads = None
        if self._stack is not None:
            self._stack.close()

    def gradient(self) -> torch.Tensor:
        """The loss gradient over the operator's parameters, flat float64 (a start
        vector for Lanczos: no product needed, the graph already holds it)."""
        if self._grads is None:
            raise RuntimeError("HessianOperator.gradient outside its context")
        return self._summed(
            torch.cat([g.detach().reshape(-1).to(torch.float64) for g in self._grads])
        )

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v, computed in the parameters' dtype, returned in ``v``'s (a float32 vector
        for a float32 model takes no float64 copy on the way)."""
        if self._grads is None:
            raise RuntimeError("HessianOperator.matvec outside its context")
        pieces, offset = [], 0
        for p in self.params:
            pieces.append(v[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        try:
            hv = torch.autograd.grad(
                self._grads,
                self.params,
                grad_outputs=pieces,
                retain_graph=True,
                allow_unused=True,
            )
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # user code (a custom backward, twice), an op, memory
            raise self._failure(
                f"Hessian-vector product {self.products + 1}",
                exc,
                _DIFFERENTIABLE,
                building=False,
            ) from exc
        self.products += 1
        del pieces
        out = torch.empty(self.n, dtype=v.dtype, device=v.device)
        parts, offset = list(hv), 0
        del hv
        for i, p in enumerate(self.params):
            h, parts[i] = parts[i], None  # each piece freed once copied
            piece = out[offset : offset + p.numel()]
            if h is None:
                piece.zero_()
            else:
                piece.copy_(h.reshape(-1))
            offset += p.numel()
        return self._summed(out)
